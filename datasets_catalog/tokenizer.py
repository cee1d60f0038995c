"""One tokenizer wrapper (docs/upstream-compat.md#special-tokens) for ingest token counts, packing and inference.

A checkpoint directory with Qwen2 tokenizer files is loaded through `transformers`; otherwise a built-in
byte-level tokenizer (256 byte symbols + the special tokens) is built with `tokenizers`, so everything
runs with no download. The role mapping (bos, eos, start/end of image) is defined here and nowhere else.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
START_OF_IMAGE_TOKEN = "<|vision_start|>"
END_OF_IMAGE_TOKEN = "<|vision_end|>"
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, START_OF_IMAGE_TOKEN, END_OF_IMAGE_TOKEN)
BUILTIN_NAME = "builtin-byte-level"
BUILTIN_SPECS = (None, "", "builtin", BUILTIN_NAME)   # tokenizer settings that mean the built-in one
_BUILTIN_ADDED = (PAD_TOKEN, *SPECIAL_TOKENS)   # ASCII, none contains another


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    start_of_image: int
    end_of_image: int


class TextTokenizer:
    """Encodes text without automatic BOS/EOS; exposes the special-token roles."""

    def __init__(self, backend, name: str, num_added_tokens: int = 0) -> None:
        self._backend = backend  # a `tokenizers.Tokenizer` or a transformers tokenizer
        self.name = name
        self.num_added_tokens = num_added_tokens  # > 0 only when special tokens were really new
        ids = [self._token_id(token) for token in SPECIAL_TOKENS]
        self.special = SpecialIds(*ids)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def builtin(cls) -> "TextTokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {symbol: i for i, symbol in enumerate(alphabet)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(list(_BUILTIN_ADDED))
        return cls(tok, BUILTIN_NAME)

    @classmethod
    def from_dir(cls, path: str | Path) -> "TextTokenizer":
        """Load the tokenizer saved in a checkpoint directory (Qwen2 files or our builtin one)."""
        path = Path(path)
        marker = path / "medloom_tokenizer.json"
        if marker.exists() and json.loads(marker.read_text()).get("name") == BUILTIN_NAME:
            return cls.builtin()
        if not any((path / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
            raise FileNotFoundError(
                f"no tokenizer files in {path}: expected tokenizer.json or vocab.json + merges.txt "
                f"(a Qwen2 tokenizer), or medloom_tokenizer.json"
            )
        from transformers import AutoTokenizer

        # the directory's JSON / text files only: never its custom code (docs/checkpoints.md)
        backend = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        existing = set(backend.all_special_tokens) | set(backend.get_vocab())
        new = [t for t in SPECIAL_TOKENS if t not in existing]
        added = backend.add_tokens(new) if new else 0  # resize only when tokens are really added
        return cls(backend, f"hf:{path.name}", num_added_tokens=added)

    @classmethod
    def load(cls, spec: str | None) -> "TextTokenizer":
        """`None`/"builtin" gives the byte-level tokenizer; anything else is a tokenizer directory."""
        if spec in BUILTIN_SPECS:
            return cls.builtin()
        return cls.from_dir(spec)

    def save(self, path: str | Path) -> None:
        """Write files that `from_dir` reads back (inference files of a checkpoint)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.name == BUILTIN_NAME:
            self._backend.save(str(path / "tokenizer.json"))
            (path / "medloom_tokenizer.json").write_text(json.dumps({"name": BUILTIN_NAME}))
        else:
            self._backend.save_pretrained(str(path))

    # -- use ----------------------------------------------------------------------------------
    def _token_id(self, token: str) -> int:
        if hasattr(self._backend, "token_to_id"):
            value = self._backend.token_to_id(token)
        else:
            value = self._backend.convert_tokens_to_ids(token)
        if value is None:
            raise KeyError(f"tokenizer {self.name} has no token {token}")
        return int(value)

    def encode(self, text: str) -> list[int]:
        if hasattr(self._backend, "token_to_id"):
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._backend.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if hasattr(self._backend, "encode_batch"):
            return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def count_tokens(self, texts: list[str]) -> list[int]:
        """len(encode(t)) for each text, without building id lists for the builtin byte-level tokenizer:
        one token per UTF-8 byte, except that each special-token string is one token (ingest counts
        millions of texts; this is ~10x faster and exactly equal, see
        tests/unit/datasets_catalog/test_tokenizer.py)."""
        if self.name != BUILTIN_NAME:
            return [len(ids) for ids in self.encode_batch(texts)]
        counts = []
        for text in texts:
            n = len(text.encode("utf-8"))
            if "<|" in text:
                for token in _BUILTIN_ADDED:
                    n -= text.count(token) * (len(token) - 1)
            counts.append(n)
        return counts

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        if hasattr(self._backend, "get_vocab_size"):
            return self._backend.get_vocab_size(with_added_tokens=True)
        return len(self._backend)
