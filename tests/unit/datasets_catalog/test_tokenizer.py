"""The tokenizer wrapper: builtin byte-level counts, special ids, save/load round trip."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from datasets_catalog.tokenizer import BUILTIN_NAME, SPECIAL_TOKENS, TextTokenizer


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.builtin()


def test_builtin_counts_utf8_bytes(tok):
    assert len(tok.encode("abc")) == 3
    assert len(tok.encode("é")) == 2              # two UTF-8 bytes
    assert len(tok.encode("胸部")) == 6
    assert tok.encode_batch(["ab", "", "xyz"]) == [tok.encode("ab"), [], tok.encode("xyz")]


def test_special_ids_are_distinct_and_outside_bytes(tok):
    ids = [tok.special.bos, tok.special.eos, tok.special.start_of_image, tok.special.end_of_image]
    assert len(set(ids)) == 4 and min(ids) >= 256
    assert tok.vocab_size == 256 + 1 + len(SPECIAL_TOKENS)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=80))
def test_round_trip_and_count(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    if not any(s in text for s in SPECIAL_TOKENS):
        assert len(ids) == len(text.encode("utf-8"))


def test_save_and_load(tmp_path, tok):
    tok.save(tmp_path)
    again = TextTokenizer.from_dir(tmp_path)
    assert again.name == BUILTIN_NAME and again.encode("chest x-ray") == tok.encode("chest x-ray")
    assert TextTokenizer.load(None).name == BUILTIN_NAME and TextTokenizer.load("builtin").name == BUILTIN_NAME
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        TextTokenizer.from_dir(tmp_path / "empty")


pieces = st.sampled_from(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>",
                          "<|", "|>", "<", "|", ">", "im_start", "é", "胸"])


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(pieces | st.text(max_size=6), max_size=12))
def test_count_tokens_equals_len_encode(tok, parts):
    texts = ["".join(parts), "".join(reversed(parts)), ""]
    assert tok.count_tokens(texts) == [len(tok.encode(t)) for t in texts]
