"""The mixture stream reading shards from object storage: the same plans and batches as from disk, and a
state saved while reading from disk resumes reading from S3."""
from __future__ import annotations

import pytest

from pipelines.storage.uris import RemotePath


def test_stream_reads_shards_from_s3_like_from_disk(bucket, small_catalog, ingest, small_mixture):
    import torch

    from datasets_catalog.tokenizer import TextTokenizer
    from pipelines.mixture.stream import MixtureStream
    from pipelines.mixture.config import MixtureConfigError
    from pipelines.mixture.sources import resolve_sources
    from pipelines.packing.config import PackingConfig

    catalog, local = small_catalog
    out = bucket / "shards"
    remote_cfg = small_mixture(catalog, str(out), "remote.yaml")          # the URI carries the endpoint
    with pytest.raises(MixtureConfigError, match="no shards for dataset 'vqa'"):
        resolve_sources(remote_cfg)                                  # nothing published yet: refused
    assert ingest(catalog, out).ok
    packing = PackingConfig(expected_num_tokens=512, max_num_tokens=768, max_num_tokens_per_sample=512,
                            prefer_buffer_before=256, max_buffer_size=4)
    tok = TextTokenizer.builtin()
    streams = [MixtureStream(c, packing, tok) for c in (small_mixture(catalog, str(local), "local.yaml"), remote_cfg)]
    assert isinstance(streams[1].groups[0].datasets[0].shard_dir, RemotePath)
    plans = [[[m.sample.sample_id for m in s.next_plan().members] for _ in range(6)] for s in streams]
    assert plans[0] == plans[1] and sum(map(len, plans[0])) >= 6
    batches = [next(iter(s)) for s in streams]                        # rows with image bytes, packed
    for name in ("packed_text_ids", "packed_position_ids", "sample_lens"):
        a, b = getattr(batches[0], name), getattr(batches[1], name)
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), name
    # a state saved while reading from disk resumes reading from S3 (paths are not part of the state)
    resumed = MixtureStream(remote_cfg, packing, tok)
    resumed.load_state_dict(streams[0].state_dict())
    assert [m.sample.sample_id for m in resumed.next_plan().members] == \
        [m.sample.sample_id for m in streams[0].next_plan().members]
