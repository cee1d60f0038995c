"""The mixture stream: weighted, seeded, resumable packs of samples for one (rank, loader worker).

Pack membership follows upstream PackedDataset (docs/upstream-compat.md#pack-membership), decided from shard metadata only
(`num_tokens`), so the whole position lives in a small state:

1. every mandatory group contributes one sample that fits `max_num_tokens_per_sample` (first, as upstream,
   so every pack carries them: FSDP ranks must all run the ViT/VAE paths);
2. a sample that overflowed the previous pack while the buffer was full (`pending`) goes next if it fits
   beside them; otherwise it waits again, and after PENDING_TRIES packs it is counted and reported as too
   long for a pack with the mandatory groups (like a never-fit sample; upstream drops it silently);
3. then, while the pack holds fewer than `expected_num_tokens`: take the oldest buffered sample if the pack
   holds fewer than `prefer_buffer_before` tokens, else draw a group by weight and its next sample; a
   sample longer than `max_num_tokens_per_sample` can never fit and is counted and reported (metrics,
   `jobs/plan.py` never_fit); one that overflows `max_num_tokens` goes to the buffer if it has room and did
   not come from it, otherwise the pack is closed and the sample waits as `pending` (upstream drops it).

Determinism: every random choice is a hash of (seed, epoch, generation, stream slot, counter); the data
order is a global permutation per pass (pipelines.mixture.order). See docs/mixture.md for resume and
world-size-change semantics.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

from datasets_catalog.tokenizer import TextTokenizer

from pipelines.mixture import rng
from pipelines.mixture.config import MixtureConfig, MixtureConfigError
from pipelines.mixture.order import (Layer, PassOrder, chunk_size, layer_first, reshard_layer, stream_position,
                                     to_global)
from pipelines.mixture.recompute import RECOMPUTE_COLUMNS, recompute_images, recompute_row
from pipelines.mixture.sources import GroupSource, ResolvedMixture, resolve_sources
from pipelines.mixture.stages import stage_index
from pipelines.packing.config import PackingConfig
from pipelines.packing.sample import StreamSample
from pipelines.storage.shard_reader import RowGroupCache, table_row

STATE_VERSION = 2   # 2: passes split across streams by rows (1: by whole chunks)
PENDING_TRIES = 4   # packs a held-over sample may wait beside the mandatory samples before it is reported
META_COLUMNS = ("sample_id", "num_tokens")
_TOKEN_PRIOR_WEIGHT = 8
_MASK63 = (1 << 63) - 1


class StreamStateError(ValueError):
    """A state that cannot be loaded into this stream; `str()` says why and what to pass instead."""


@dataclass
class Drawn:
    """One drawn sample, known from metadata only; `v` is its position in this stream's newest layer."""

    group: int
    v: int
    draw_key: int
    sample: StreamSample
    ds: int
    row: int
    g: int = -1          # global position (pass * span + position): for tests and tools
    pass_index: int = -1  # which pass over its group this draw belongs to

    @property
    def cost(self) -> int:
        return self.sample.num_tokens

    def ref(self) -> list[int]:
        return [self.group, self.v, self.draw_key]


@dataclass
class PackPlan:
    """A pack decided from metadata: what `jobs/plan.py` counts and what the packer materialises."""

    members: list[Drawn]
    tokens: int
    metrics: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> list[StreamSample]:
        return [d.sample for d in self.members]


class MixtureStream:
    """Endless `PackedBatch`es for one (rank, world_size, worker_id, num_workers) from (seed, epoch)."""

    def __init__(self, cfg: MixtureConfig, packing: PackingConfig, tokenizer: TextTokenizer, rank: int = 0,
                 world_size: int = 1, worker_id: int = 0, num_workers: int = 1, seed: int = 42, epoch: int = 0,
                 resolved: ResolvedMixture | None = None, cache_bytes: int | None = None,
                 grad_accum: int = 1) -> None:
        if not (0 <= rank < world_size and 0 <= worker_id < num_workers):
            raise ValueError(f"need 0 <= rank < world_size and 0 <= worker_id < num_workers, got rank={rank}, "
                             f"world_size={world_size}, worker_id={worker_id}, num_workers={num_workers}")
        self.cfg, self.packing, self.tokenizer = cfg, packing, tokenizer
        self.rank, self.world_size, self.worker_id, self.num_workers = rank, world_size, worker_id, num_workers
        self.slots = world_size * num_workers
        self.slot = rank * num_workers + worker_id
        self.seed = cfg.seed if cfg.seed is not None else seed
        self.epoch = epoch
        self.resolved = resolved or resolve_sources(cfg)
        self.groups: list[GroupSource] = self.resolved.groups
        self.chunks = [chunk_size(g.block_len, cfg.shuffle_window_blocks) for g in self.groups]
        self.orders = [PassOrder(g.block_len, (self.seed, self.epoch, g.name, g.config.shuffle_seed),
                                 g.config.shuffle_lines, c) for g, c in zip(self.groups, self.chunks)]
        self.mandatory = [g.index for g in self.groups if g.config.is_mandatory]
        # curriculum stages go by optimizer step: this stream's pack p is pack p * num_workers + worker_id of
        # its rank (the trainer takes loader slots round-robin), and grad_accum packs make one step
        self.grad_accum = max(1, int(grad_accum))
        self.weights = cfg.weights()
        # a stream works through one chunk (about shuffle_window_blocks row groups, +2 for unaligned edges)
        # per group at a time: hold that many row groups so random order inside a chunk never re-reads
        working_set = len(self.groups) * (cfg.shuffle_window_blocks + 2)
        if cache_bytes is None:   # default: the working set, so no row group is read twice per chunk
            cache_bytes = max(64 << 20, sum(
                (cfg.shuffle_window_blocks + 2) * max(int(d.layout.rg_bytes.max()) if len(d.layout.rg_bytes) else 0
                                                      for d in g.datasets) for g in self.groups))
        self.cache_bytes = cache_bytes
        self._meta_cache = RowGroupCache(max_bytes=64 << 20, max_items=max(64, 2 * working_set))
        self._row_cache = RowGroupCache(max_bytes=cache_bytes, max_items=max(16, working_set))
        self._token_prior: list[float | None] = [None] * len(self.groups)
        self._draw_sinks: list[list] = []
        self._reset(generation=0, layers=[[] for _ in self.groups])

    # -- state --------------------------------------------------------------------------------------
    def _reset(self, generation: int, layers: list[list[Layer]], step_offset: int = 0) -> None:
        self.generation = generation
        self.step_offset = step_offset   # optimizer steps before this topology (world-size changes)
        self.layers = layers
        self.cursors = [0] * len(self.groups)
        self.choices = 0          # weighted group draws
        self.draws = 0            # sample draws (draw keys)
        self.packs = 0
        self.buffer: deque[Drawn] = deque()
        self.pending: Drawn | None = None
        self.pending_tries = 0    # packs the pending sample could not join beside the mandatory samples
        self.stats = {"samples": [0] * len(self.groups), "tokens": [0] * len(self.groups),
                      "skipped_too_long": [0] * len(self.groups)}

    def _fingerprint(self) -> dict[str, list[int]]:
        """Per group [rows, chunk]: a state only fits a stream whose groups have the same layout."""
        return {g.name: [g.total, self.chunks[g.index]] for g in self.groups}

    def state_dict(self) -> dict[str, Any]:
        """Small JSON-serialisable position: cursors, counters, buffer and pending sample refs, layers."""
        return {
            "version": STATE_VERSION, "kind": "stream", "seed": self.seed, "epoch": self.epoch,
            "rank": self.rank, "world_size": self.world_size, "worker_id": self.worker_id,
            "num_workers": self.num_workers, "slot": self.slot, "slots": self.slots,
            "groups": self._fingerprint(), "generation": self.generation,
            "layers": {g.name: [l.to_state() for l in self.layers[g.index]] for g in self.groups},
            "cursors": {g.name: self.cursors[g.index] for g in self.groups},
            "choices": self.choices, "draws": self.draws, "packs": self.packs,
            "buffer": [d.ref() for d in self.buffer],
            "pending": self.pending.ref() if self.pending else None,
            "pending_tries": self.pending_tries,
            "stats": {k: list(v) for k, v in self.stats.items()},
            "step_offset": self.step_offset, "grad_accum": self.grad_accum, "next_step": self.step(),
        }

    def step(self, pack: int | None = None) -> int:
        """The optimizer step (0-based) that this stream's pack `pack` (default: the next one) feeds."""
        pack = self.packs if pack is None else pack
        return self.step_offset + (pack * self.num_workers + self.worker_id) // self.grad_accum

    def stage(self, pack: int | None = None) -> int:
        """Index of the curriculum stage of pack `pack` (default: the next one); 0 without stages."""
        return stage_index(self.cfg.stages, self.step(pack)) if self.cfg.stages else 0

    def _check_common(self, state: dict[str, Any]) -> None:
        if isinstance(state, dict) and state.get("version") == 1:
            raise StreamStateError("the state is of version 1 (passes split across streams by whole chunks); "
                                   "this version splits them by rows and cannot continue it: resume with "
                                   "--resume_model_only True (weights only, a fresh data stream) or finish the "
                                   "run with the MedLoom version that wrote it")
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise StreamStateError(f"not a mixture stream state of version {STATE_VERSION}")
        if (state["seed"], state["epoch"]) != (self.seed, self.epoch):
            raise StreamStateError(f"state is for seed {state['seed']}, epoch {state['epoch']}; this stream has "
                                   f"seed {self.seed}, epoch {self.epoch}")
        if state["groups"] != self._fingerprint():
            raise StreamStateError(f"state was taken with groups {state['groups']}, this config gives "
                                   f"{self._fingerprint()}; a changed mixture cannot resume mid-pass")

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Resume. A state of this very stream resumes exactly; the states of *all* streams of an earlier
        run (a list, or `merge_states(...)`) continue the current passes with any new world size."""
        if isinstance(state, (list, tuple)):
            state = merge_states(state)
        self._check_common(state)
        layers = [[Layer.from_state(l) for l in state["layers"][g.name]] for g in self.groups]
        if state["kind"] == "merged":
            self._reset(state["generation"], layers, int(state.get("step_offset", 0)))
            return
        if (state["slot"], state["slots"]) != (self.slot, self.slots):
            raise StreamStateError(
                f"state belongs to stream slot {state['slot']} of {state['slots']} (rank {state['rank']}/"
                f"{state['world_size']}, worker {state['worker_id']}/{state['num_workers']}), this is slot "
                f"{self.slot} of {self.slots}; after a change of world size or workers pass the states of all "
                f"old streams (a list, or pipelines.mixture.stream.merge_states(states))")
        if int(state.get("grad_accum", 1)) != self.grad_accum and self.cfg.stages:
            raise StreamStateError(f"state was taken with gradient_accumulation_steps {state.get('grad_accum')}, "
                                   f"this stream has {self.grad_accum}; curriculum stages count optimizer steps, "
                                   f"so resume with the same value")
        self._reset(state["generation"], layers, int(state.get("step_offset", 0)))
        self.cursors = [int(state["cursors"][g.name]) for g in self.groups]
        self.choices, self.draws, self.packs = int(state["choices"]), int(state["draws"]), int(state["packs"])
        self.stats = {k: list(v) for k, v in state["stats"].items()}
        self.buffer = deque(self._fetch(*ref) for ref in state["buffer"])
        self.pending = self._fetch(*state["pending"]) if state["pending"] else None
        self.pending_tries = int(state.get("pending_tries", 0))

    # -- drawing -----------------------------------------------------------------------------------
    def _locate(self, gi: int, v: int) -> tuple[int, int, int] | None:
        """(dataset index in group, dataset row, global position) of virtual position v of group gi,
        or None for a group without rows (a pass has no void positions since the split is by rows)."""
        group = self.groups[gi]
        g = to_global(self.layers[gi], v)
        where = self.orders[gi].split(g)
        if where is None:
            return None
        block, offset = self.orders[gi].locate(*where)
        return int(group.block_ds[block]), int(group.block_row[block]) + offset, g

    def _fetch(self, gi: int, v: int, draw_key: int, where: tuple[int, int, int] | None = None) -> Drawn:
        """The sample at position v of group gi (`where`: its `_locate` result, when already known)."""
        group = self.groups[gi]
        di, row, g = where or self._locate(gi, v)   # refs always name a row
        ds = group.datasets[di]
        rg, off = ds.layout.find(row)
        path, rgi = ds.layout.row_group(rg)
        if ds.recompute is None:
            table = self._meta_cache.table(path, rgi, META_COLUMNS)
            sample_id = table.column(0)[off].as_py()
            num_tokens = int(table.column(1)[off].as_py())
        else:
            table = self._meta_cache.table(path, rgi, META_COLUMNS + RECOMPUTE_COLUMNS)
            full = recompute_row(table_row(table, off), ds.task, *ds.recompute, self.tokenizer)
            sample_id, num_tokens = full["sample_id"], int(full["num_tokens"])
        sample = StreamSample(sample_id=sample_id, dataset=ds.name, group=group.name, task=ds.task.name,
                              num_tokens=num_tokens, row={"sample_id": sample_id, "num_tokens": num_tokens},
                              data_dir=ds.data_dir, draw_key=draw_key)
        return Drawn(gi, v, draw_key, sample, di, row, g, g // self.orders[gi].span)

    def _next_v(self, gi: int) -> tuple[int, tuple[int, int, int]]:
        """This stream's next position of group gi and its `_locate` result (advances the cursor)."""
        while True:
            v = self._position(gi, self.cursors[gi])
            self.cursors[gi] += 1
            where = self._locate(gi, v)
            if where is not None:
                return v, where

    def peek_global(self, gi: int) -> int:
        """Global position of this stream's next draw from group gi; for tools."""
        return to_global(self.layers[gi], self._position(gi, self.cursors[gi]))

    def _position(self, gi: int, j: int) -> int:
        """Position (in the newest layer) of this stream's j-th draw from group gi."""
        return stream_position(self.slot, self.slots, self.groups[gi].total, layer_first(self.layers[gi]), j)

    def _draw_from(self, gi: int) -> Drawn:
        v, where = self._next_v(gi)
        key = rng.key(self.seed, "draw", self.epoch, self.generation, self.slot, self.draws) & _MASK63
        self.draws += 1
        drawn = self._fetch(gi, v, key, where)
        for sink in self._draw_sinks:
            sink.append(drawn)
        return drawn

    def log_draws(self, sink: list) -> None:
        """Append every future draw (a `Drawn`, with its global position `g`) to `sink`: a sample ledger."""
        self._draw_sinks.append(sink)

    def _mean_tokens(self, gi: int) -> float:
        if self._token_prior[gi] is None:   # mean of the first row group this group reads: metadata only
            group = self.groups[gi]
            ds = group.datasets[int(group.block_ds[0])]
            rg, _ = ds.layout.find(int(group.block_row[0]))
            table = self._meta_cache.table(*ds.layout.row_group(rg), META_COLUMNS)
            values = table.column(1).to_pylist()
            self._token_prior[gi] = float(sum(values)) / max(1, len(values))
        n, t = self.stats["samples"][gi], self.stats["tokens"][gi]
        return (t + self._token_prior[gi] * _TOKEN_PRIOR_WEIGHT) / (n + _TOKEN_PRIOR_WEIGHT)

    def choose_group(self) -> int:
        """A group by weight (shares of samples, or of tokens with weight_unit: tokens)."""
        u = rng.uniform(self.seed, "group", self.epoch, self.generation, self.slot, self.choices)
        self.choices += 1
        weights = self.cfg.weights(self.step()) if self.cfg.stages else self.weights
        if self.cfg.weight_unit == "tokens":
            raw = [w / self._mean_tokens(i) if w > 0 else 0.0 for i, w in enumerate(weights)]
            total = sum(raw)
            weights = [r / total for r in raw]
        acc = 0.0
        for i, w in enumerate(weights):
            acc += w
            if u < acc:
                return i
        return max(i for i, w in enumerate(weights) if w > 0)

    # -- packing -----------------------------------------------------------------------------------
    def _too_long(self, d: Drawn, skipped: list[Drawn]) -> bool:
        if d.cost > self.packing.max_num_tokens_per_sample:
            self.stats["skipped_too_long"][d.group] += 1
            skipped.append(d)
            return True
        return False

    def _guard(self, misses: int) -> None:
        if misses > sum(g.total for g in self.groups) + 1000:
            raise MixtureConfigError(
                f"no sample fits max_num_tokens_per_sample={self.packing.max_num_tokens_per_sample} after "
                f"{misses} draws; raise it or check the data with python jobs/plan.py")

    def next_plan(self) -> PackPlan:
        """Decide the next pack from metadata (no image is read); advances the stream."""
        cfg = self.packing
        members: list[Drawn] = []
        skipped: list[Drawn] = []
        mandatory_missing: list[str] = []
        curr = 0
        for gi in self.mandatory:
            misses = 0
            while True:
                d = self._draw_from(gi)
                if not self._too_long(d, skipped):
                    break
                misses += 1
                self._guard(misses)
            if curr + d.cost > cfg.max_num_tokens:
                # the mandatory samples of one pack exceed max_num_tokens together (a config problem, reported
                # in the metrics); the sample is not dropped: it opens the buffer for the next pack
                self.buffer.appendleft(d)
                mandatory_missing.append(self.groups[gi].name)
                continue
            members.append(d)
            curr += d.cost
        if self.pending is not None:
            d, self.pending = self.pending, None
            if curr + d.cost <= cfg.max_num_tokens:
                members.append(d)
                curr += d.cost
                self.pending_tries = 0
            elif self.pending_tries + 1 >= PENDING_TRIES:
                self.stats["skipped_too_long"][d.group] += 1   # counted and listed, never silent
                skipped.append(d)
                self.pending_tries = 0
            else:
                self.pending, self.pending_tries = d, self.pending_tries + 1
        misses = 0
        while curr < cfg.expected_num_tokens:
            from_buffer = bool(self.buffer) and curr < cfg.prefer_buffer_before
            if from_buffer:
                d = self.buffer.popleft()
            else:
                d = self._draw_from(self.choose_group())
                if self._too_long(d, skipped):
                    misses += 1
                    self._guard(misses)
                    continue
            misses = 0
            if curr + d.cost > cfg.max_num_tokens:
                if not from_buffer and len(self.buffer) < cfg.max_buffer_size:
                    self.buffer.append(d)
                    continue
                if self.pending is None:
                    self.pending = d      # never dropped: it goes first after the next pack's mandatory samples
                else:
                    self.buffer.appendleft(d)   # the pending slot is taken: wait at the buffer's head instead
                break
            members.append(d)
            curr += d.cost
        stage = self.stage()
        step = self.step()
        self.packs += 1
        tokens_per_group: dict[str, int] = {}
        samples_per_group: dict[str, int] = {}
        for d in members:
            name = self.groups[d.group].name
            tokens_per_group[name] = tokens_per_group.get(name, 0) + d.cost
            samples_per_group[name] = samples_per_group.get(name, 0) + 1
            self.stats["samples"][d.group] += 1
            self.stats["tokens"][d.group] += d.cost
        metrics = {
            "pack_index": self.packs - 1,
            "packing_efficiency": curr / cfg.max_num_tokens,
            "tokens": curr,
            "num_samples": len(members),
            "tokens_per_group": tokens_per_group,
            "samples_per_group": samples_per_group,
            "samples_skipped_too_long": sum(self.stats["skipped_too_long"]),
            "skipped_too_long_ids": [d.sample.sample_id for d in skipped],
            "buffer_size": len(self.buffer),
            "mandatory_missing": mandatory_missing,
            "step": step,
            "stage": stage,
        }
        return PackPlan(members, curr, metrics, self.state_dict())

    # -- materialising -----------------------------------------------------------------------------
    def full_sample(self, d: Drawn) -> StreamSample:
        """The drawn sample with its whole shard row, sizes matching the config (image bytes included, except
        for store_pixels shards read at their own transforms, whose stored pixels replace them).

        Safe in a worker thread (the row cache is thread-safe; nothing is tokenised here)."""
        ds = self.groups[d.group].datasets[d.ds]
        rg, off = ds.layout.find(d.row)
        table = self._row_cache.table(*ds.layout.row_group(rg), ds.row_columns)
        row = table_row(table, off)
        if ds.recompute is not None:
            # images only: num_tokens was recomputed when the sample was drawn (`_fetch`), with the same rule
            row = {**recompute_images(row, ds.task, *ds.recompute), "num_tokens": d.sample.num_tokens}
        s = d.sample
        return StreamSample(sample_id=s.sample_id, dataset=s.dataset, group=s.group, task=s.task,
                            num_tokens=int(row["num_tokens"]), row=row, data_dir=s.data_dir, draw_key=s.draw_key)

    def materialise(self, plan: PackPlan, tokenizer: TextTokenizer | None = None):
        """The `PackedBatch` of a decided pack (reads its rows, then `build_batch`); safe in a worker thread
        given a thread-safe `tokenizer`."""
        return self.build_batch(plan, [self.full_sample(d) for d in plan.members], tokenizer)

    def build_batch(self, plan: PackPlan, samples: Sequence[StreamSample], tokenizer: TextTokenizer | None = None):
        """Tensors of a decided pack from its full rows: a pure function of (plan, samples), safe to run in
        a worker thread (touches no stream state and no cache; pass a thread-safe `tokenizer` there)."""
        from pipelines.packing.packer import build_packed_batch   # the packer

        batch = build_packed_batch(samples, self.packing, tokenizer or self.tokenizer, self.seed)
        # the samples actually packed (one whose image could not be decoded is listed in skipped_samples)
        batch.batch_data_indexes = [{"sample_id": d["sample_id"], "dataset": d["dataset"], "group": d["group"]}
                                    for d in batch.batch_data_indexes]
        # the packer's real counts (after CFG dropout) win over the plan's
        batch.metrics = {**plan.metrics, **(batch.metrics or {})}
        batch.stream_state = plan.state
        return batch

    def __iter__(self):
        while True:
            yield self.materialise(self.next_plan())

    def batches(self, threads: int = 2, lookahead: int | None = None):
        """Endless batches, identical to `iter(self)`, built `lookahead` packs ahead by `threads` threads.

        Returns a `PrefetchingBatches`: iterate it, and checkpoint its `state_dict()` (or the last consumed
        batch's `stream_state`), never this stream's own `state_dict()`, which runs ahead by the look-ahead.
        """
        from pipelines.mixture.prefetch import PrefetchingBatches

        return PrefetchingBatches(self, threads=threads, lookahead=lookahead)


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Combine the states of all streams of one run into one state any new topology can load.

    The result continues every group's current pass: positions the old streams had not reached, and the
    samples they held in flight (packer buffer and pending sample, never trained), are handed out again;
    everything they trained is not. See docs/mixture.md.
    """
    states = [s for s in states]
    if not states:
        raise StreamStateError("merge_states needs the states of all streams, got none")
    if any(s.get("kind") != "stream" for s in states):
        raise StreamStateError("merge_states takes per-stream states (the `stream_state` of the last batch "
                               "each rank/worker trained on)")
    first = states[0]
    slots = first["slots"]
    for s in states:
        for k in ("version", "seed", "epoch", "groups", "generation", "slots"):
            if s[k] != first[k]:
                raise StreamStateError(f"states disagree on {k!r} ({s[k]!r} vs {first[k]!r}); they are not "
                                       f"from one run")
        if json.dumps(s["layers"], sort_keys=True) != json.dumps(first["layers"], sort_keys=True):
            raise StreamStateError("states disagree on their resharding history; they are not from one run")
    by_slot = {s["slot"]: s for s in states}
    missing = sorted(set(range(slots)) - set(by_slot))
    if missing or len(states) != slots:
        raise StreamStateError(f"need exactly one state per stream slot 0..{slots - 1} (world_size x num_workers); "
                               f"missing slots {missing}, got {len(states)} states")
    layers = {}
    for name in first["groups"]:
        gi = list(first["groups"]).index(name)
        cursors = [int(by_slot[s]["cursors"][name]) for s in range(slots)]
        inflight = []
        for s in range(slots):
            refs = list(by_slot[s]["buffer"]) + ([by_slot[s]["pending"]] if by_slot[s]["pending"] else [])
            inflight += [int(v) for g, v, _ in refs if g == gi]
        rows = int(first["groups"][name][0])
        old = [Layer.from_state(l) for l in first["layers"][name]]
        layers[name] = first["layers"][name] + [reshard_layer(slots, rows, layer_first(old), cursors,
                                                              inflight).to_state()]
    stats = {k: [sum(s["stats"][k][i] for s in states) for i in range(len(first["groups"]))]
             for k in first["stats"]}
    return {"version": first["version"], "kind": "merged", "seed": first["seed"], "epoch": first["epoch"],
            "groups": first["groups"], "generation": first["generation"] + 1, "layers": layers,
            "previous_slots": slots, "stats": stats,
            # the optimizer step the new streams start at: the earliest next step of the old streams (at a
            # checkpoint, every rank has finished the same steps)
            "step_offset": min(int(s.get("next_step", 0)) for s in states)}
