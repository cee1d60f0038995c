"""trainer.parallel: FSDP2 wrapping over two spawned gloo ranks on the CPU."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def _wrap_and_report(rank: int, world: int, port: int, strategy: str, out: str) -> None:
    """One spawned gloo rank: wrap the tiny model with FSDP2, write what this rank holds and writes."""
    import os

    import torch.distributed as dist

    from model.config import ModelConfig
    from model.unified import UnifiedModel
    from trainer.parallel import wrap_fsdp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = UnifiedModel(ModelConfig.tiny())
        par = wrap_fsdp(model, freeze_vae=True, sharding_strategy=strategy, num_replicate=1, num_shard=None,
                        cpu_offload=False, activation_checkpointing=False, device_type="cpu", param_dtype=None)
        w = model.language_model.lm_head.weight
        Path(out, f"{rank}.json").write_text(json.dumps({"local": list(w.to_local().shape), "full": list(w.shape),
                                                         "write": par.optimizer_shard,
                                                         "read": par.optimizer_load_shard}))
    finally:
        dist.destroy_process_group()


def test_fsdp_no_shard_keeps_parameters_whole_on_every_rank(tmp_path):
    """NO_SHARD: every rank holds every parameter whole (HSDP with shard groups of one); rank 0 alone writes
    the single optimizer file and every rank reads it."""
    import torch.multiprocessing as mp
    from tests.helpers.ray_nodes import free_port

    mp.spawn(_wrap_and_report, args=(2, free_port(), "NO_SHARD", str(tmp_path)), nprocs=2)
    reports = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert all(r["local"] == r["full"] for r in reports)
    assert [r["write"] for r in reports] == [[0, 1], None] and all(r["read"] == [0, 1] for r in reports)
