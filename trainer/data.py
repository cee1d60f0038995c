"""The per-rank batch source: the mixture stream (pipelines.mixture.stream) behind a picklable factory, so it can
be built inside background loader processes and restored from a checkpoint's exact stream state.

With N loader processes per rank, loader slot k runs the stream's worker k of N (each reads its own share).
torch's DataLoader hands batches out round-robin, so the trainer remembers, per slot, the state attached to
the last batch it *consumed* from that slot, plus which slot comes next; on resume the slots are rotated so
the first batch comes from that slot. Resume is exact for any N, as long as N does not change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from pipelines.mixture.config import MixtureConfig
from pipelines.packing.config import PackingConfig


LOADER_FORMAT = "medloom-loader-v1"


@dataclass
class LoaderState:
    """What a checkpoint stores per rank: every loader slot's stream state and the next slot to consume."""
    num_slots: int = 1
    next_slot: int = 0
    states: list[Optional[dict]] = field(default_factory=lambda: [None])

    @classmethod
    def fresh(cls, num_slots: int) -> "LoaderState":
        return cls(num_slots, 0, [None] * num_slots)

    def consumed(self, batch) -> None:
        slot = int((batch.metrics or {}).get("loader_slot", 0))
        self.states[slot] = batch.stream_state
        self.next_slot = (slot + 1) % self.num_slots

    def to_json(self) -> dict:
        return {"format": LOADER_FORMAT, "num_slots": self.num_slots, "next_slot": self.next_slot,
                "states": list(self.states)}

    @classmethod
    def from_json(cls, data: Optional[dict], num_slots: int) -> "LoaderState":
        if data is None:
            return cls.fresh(num_slots)
        if data.get("format") != LOADER_FORMAT:          # a bare stream state: one slot
            data = {"num_slots": 1, "next_slot": 0, "states": [data]}
        if int(data["num_slots"]) != num_slots:
            raise ValueError(f"the checkpoint's data stream ran with {data['num_slots']} loader slot(s) per rank, "
                             f"this run has {num_slots}: resume with --dataloader_workers "
                             f"{max(1, int(data['num_slots']))} (0 and 1 both mean one slot)")
        return cls(num_slots, int(data["next_slot"]), list(data["states"]))


@dataclass
class StreamFactory:
    """`factory(i, n)` builds the `MixtureStream` of loader process i of n for one rank (slot (i + offset) mod
    n, restored from its saved state) and yields PackedBatch forever, tagged with their slot. It carries the
    parsed mixture (picklable), so loader processes never re-read the YAML."""
    mixture: MixtureConfig
    packing: PackingConfig
    tokenizer_spec: Optional[str]
    rank: int
    world_size: int
    seed: int
    loader: LoaderState = field(default_factory=LoaderState)
    threads: int = 0   # >0: batches built ahead by this many threads (stream.batches; identical batches)
    grad_accum: int = 1   # packs per optimizer step: curriculum stages count optimizer steps

    def build(self, slot: int = 0):
        from datasets_catalog.tokenizer import TextTokenizer
        from pipelines.mixture.stream import MixtureStream

        tok = TextTokenizer.load(self.tokenizer_spec)
        n = self.loader.num_slots
        stream = MixtureStream(self.mixture, self.packing, tok, rank=self.rank, world_size=self.world_size,
                               worker_id=slot, num_workers=n, seed=self.seed, grad_accum=self.grad_accum)
        if self.loader.states[slot] is not None:
            stream.load_state_dict(self.loader.states[slot])
        return stream

    def __call__(self, index: int = 0, count: int = 1) -> Iterator[Any]:
        if count != self.loader.num_slots:
            raise ValueError(f"{count} loader processes for {self.loader.num_slots} stream slots")
        slot = (index + self.loader.next_slot) % count
        stream = self.build(slot)
        # each batch carries the state after itself, so the look-ahead never makes a checkpoint inexact
        for batch in (stream.batches(threads=self.threads) if self.threads else stream):
            batch.metrics = {**(batch.metrics or {}), "loader_slot": slot}
            yield batch


def load_mixture(mixture: MixtureConfig | str, catalog: Optional[str] = None,
                 shards: Optional[str] = None) -> MixtureConfig:
    """The parsed mixture config: a path is read (once per run: pass the result on), a config is kept. The
    run's --catalog / --shards (absolute after trainer.config.resolve_paths) win over the YAML's keys."""
    cfg = mixture if isinstance(mixture, MixtureConfig) else MixtureConfig.from_yaml(mixture)
    return cfg.with_locations(catalog, shards) if catalog or shards else cfg


def generation_groups(mixture: MixtureConfig | str) -> list[str]:
    """Names of mixture groups whose task emits noised VAE targets (needed when visual_gen is on)."""
    cfg = load_mixture(mixture)
    used = [max([g.weight] + [s.weights[i] for s in cfg.stages]) > 0 for i, g in enumerate(cfg.groups)]
    return [g.name for g, u in zip(cfg.groups, used) if g.task.generation and u]


def mandatory_coverage(mixture: MixtureConfig | str) -> dict[str, bool]:
    """Whether every pack is guaranteed ViT tokens and generation targets by its mandatory groups (what keeps
    FSDP ranks running the same units, docs/upstream-compat.md#distribution)."""
    mandatory = [g for g in load_mixture(mixture).groups if g.is_mandatory]
    return {"vit": any(g.task.always_vit for g in mandatory),
            "gen": any(g.task.generation for g in mandatory)}
