"""Replays data streams from saved states, to check what a resumed run trains: which pass-0 samples the
old streams trained before a checkpoint and which the new streams draw after it."""
from __future__ import annotations

from pipelines.mixture.config import MixtureConfig
from pipelines.mixture.stream import MixtureStream
from pipelines.packing.config import PackingConfig


def trained_before(cfg: MixtureConfig, packing: PackingConfig, tok, state: dict, seed: int) -> list:
    """The draws an old stream trained up to `state` (replayed from the start, minus its in-flight samples)."""
    s = MixtureStream(cfg, packing, tok, rank=state["rank"], world_size=state["world_size"],
                      worker_id=state["worker_id"], num_workers=state["num_workers"], seed=seed,
                      grad_accum=state.get("grad_accum", 1))
    log: list = []
    s.log_draws(log)
    for _ in range(state["packs"]):
        s.next_plan()
    assert s.state_dict()["cursors"] == state["cursors"], "replay does not reach the saved state"
    inflight = {(g, v) for g, v, _ in state["buffer"] + ([state["pending"]] if state["pending"] else [])}
    return [d for d in log if (d.group, d.v) not in inflight]


def drawn_until_pass_done(stream: MixtureStream, max_packs: int = 500) -> list:
    """Every draw of `stream` until it has left pass 0 of every group."""
    log: list = []
    stream.log_draws(log)
    for _ in range(max_packs):
        if all(stream.peek_global(g.index) >= stream.orders[g.index].span for g in stream.groups):
            return log
        stream.next_plan()
    raise AssertionError("stream did not finish its first pass")


def pass0_ids(draws: list, group: int) -> list[str]:
    return [d.sample.sample_id for d in draws if d.group == group and d.pass_index == 0]
