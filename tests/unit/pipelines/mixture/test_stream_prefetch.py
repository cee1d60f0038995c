"""The threaded look-ahead path (`MixtureStream.batches`) yields bit-for-bit the sequential batches and
resumes exactly from the state of the last *consumed* batch, although it has built packs beyond it."""
from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch

from datasets_catalog.tokenizer import TextTokenizer
from pipelines.mixture.stream import MixtureStream
from pipelines.mixture.config import MixtureConfig
from pipelines.mixture.prefetch import PrefetchingBatches
from pipelines.packing.packed_batch import PackedBatch
from pipelines.packing.config import PackingConfig
from tests.helpers.shard_factory import make_catalog, tiny, write_config

PACKING = PackingConfig(expected_num_tokens=1024, max_num_tokens=1280, max_num_tokens_per_sample=1024,
                        prefer_buffer_before=512, max_buffer_size=4)
MIX = """
sft: {dataset_names: [vqa], weight: 2}
edit: {dataset_names: [ed], weight: 1}
t2i: {dataset_names: [gen], weight: 1}
"""


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> MixtureConfig:
    root = tmp_path_factory.mktemp("prefetch")
    catalog = make_catalog(root, [tiny("vqa", "sft", 40), tiny("ed", "edit", 25), tiny("gen", "t2i", 25)])
    return MixtureConfig.from_yaml(write_config(root / "mix.yaml", f"catalog: {catalog}\n{MIX}"))


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.builtin()


def _stream(cfg, tok) -> MixtureStream:
    return MixtureStream(cfg, PACKING, tok, seed=7)


def assert_same_batch(a: PackedBatch, b: PackedBatch) -> None:
    for f in fields(PackedBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), f.name
        elif isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            assert len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y)), f.name
        else:
            assert json.dumps(x, sort_keys=True, default=str) == json.dumps(y, sort_keys=True, default=str), f.name


@pytest.fixture(scope="module")
def sequential(cfg, tok) -> list[PackedBatch]:
    it = iter(_stream(cfg, tok))
    return [next(it) for _ in range(10)]


@pytest.mark.parametrize("threads,lookahead", [(1, 1), (2, 3), (3, 5)])
def test_threaded_lookahead_yields_exactly_the_sequential_batches(cfg, tok, sequential, threads, lookahead):
    assert any(b.padded_images is not None for b in sequential) and any(b.packed_vit_tokens is not None
                                                                         for b in sequential)
    with _stream(cfg, tok).batches(threads=threads, lookahead=lookahead) as it:
        got = [next(it) for _ in range(len(sequential))]
    for a, b in zip(sequential, got):
        assert_same_batch(a, b)


def test_state_is_the_consumed_position_and_resume_is_exact(cfg, tok, sequential):
    s = _stream(cfg, tok)
    with s.batches(threads=2, lookahead=4) as it:
        initial = it.state_dict()
        assert initial == _stream(cfg, tok).state_dict()
        for b in sequential[:4]:
            assert_same_batch(b, next(it))
        state = it.state_dict()
        assert state == sequential[3].stream_state
        assert s.state_dict()["packs"] > state["packs"]          # the stream itself has run ahead
        json.dumps(state)                                          # small and serialisable
    with _stream(cfg, tok).batches(threads=2, lookahead=2) as resumed:
        resumed.load_state_dict(json.loads(json.dumps(state)))
        for b in sequential[4:]:
            assert_same_batch(b, next(resumed))


def test_loading_a_state_mid_run_drops_the_lookahead(cfg, tok, sequential):
    with _stream(cfg, tok).batches(threads=2, lookahead=3) as it:
        for _ in range(6):
            next(it)
        it.load_state_dict(sequential[1].stream_state)          # rewind while packs 6.. are in flight
        assert it.state_dict() == sequential[1].stream_state
        for b in sequential[2:6]:
            assert_same_batch(b, next(it))


def test_zero_threads_is_the_sequential_path(cfg, tok, sequential):
    it = _stream(cfg, tok).batches(threads=0)
    assert isinstance(it, PrefetchingBatches) and it.lookahead == 0
    for b in sequential[:3]:
        assert_same_batch(b, next(it))
    with pytest.raises(ValueError, match="threads"):
        _stream(cfg, tok).batches(threads=-1)


def test_an_error_deciding_a_later_pack_surfaces_in_order(cfg, tok, sequential):
    """The look-ahead meets the error early; the batches before it are still handed out first."""
    s = _stream(cfg, tok)
    real, calls = s.next_plan, []

    def failing_next_plan():
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("shard vanished")
        return real()

    s.next_plan = failing_next_plan
    with s.batches(threads=2, lookahead=3) as it:
        for b in sequential[:4]:
            assert_same_batch(b, next(it))
        with pytest.raises(RuntimeError, match="shard vanished"):
            next(it)


def test_store_pixels_shards_give_the_same_batches_without_reading_image_bytes(tmp_path, tok, sequential):
    """Same records ingested with --store-pixels: bit-identical batches (sequential and threaded), built
    from the stored pixels (the original bytes column is not even read)."""
    catalog = make_catalog(tmp_path, [tiny("vqa", "sft", 40, store_pixels=True),
                                      tiny("ed", "edit", 25, store_pixels=True),
                                      tiny("gen", "t2i", 25, store_pixels=True)])
    pixels_cfg = MixtureConfig.from_yaml(write_config(tmp_path / "mix.yaml", f"catalog: {catalog}\n{MIX}"))
    stream = _stream(pixels_cfg, tok)
    it = iter(stream)
    for want in sequential:
        assert_same_batch(next(it), want)
    drawn = stream.next_plan().members[0]
    image = (stream.full_sample(drawn).row["input_images"] or stream.full_sample(drawn).row["output_images"])[0]
    assert "bytes" not in image and image["vae_pixels"] is not None
    with _stream(pixels_cfg, tok).batches(threads=2, lookahead=3) as threaded:
        for want in sequential:
            assert_same_batch(next(threaded), want)


def test_row_group_cache_is_thread_safe_and_reads_each_group_once(cfg):
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.storage.shard_reader import RowGroupCache

    stream = _stream(cfg, TextTokenizer.builtin())
    layout = stream.groups[0].datasets[0].layout
    keys = [layout.row_group(rg) for rg in range(len(layout.rg_rows))] * 6
    cache = RowGroupCache(max_bytes=1 << 30, max_items=1000)
    with ThreadPoolExecutor(8) as pool:
        tables = list(pool.map(lambda k: cache.table(*k, None), keys))
    assert cache.reads == len(layout.rg_rows)
    for key, table in zip(keys, tables):
        assert table.equals(cache.table(*key, None))
    assert cache.reads == len(layout.rg_rows)
