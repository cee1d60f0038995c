"""Where the j-th draw of a stream lands: pass permutations and the split of passes across streams.

Two pure, integer-only pieces (no I/O, no state beyond small caches):

* `PassOrder`: the order of a group's rows in pass k. Blocks (row groups, at most MAX_BLOCK_ROWS rows)
  are permuted, then rows are permuted inside windows of `window_blocks` consecutive blocks. Keys come
  from the counter-based RNG (seed, epoch, group, shuffle_seed, pass), so the order changes every pass and
  is the same on every machine. Memory: O(blocks) per cached pass, never O(rows). Reading stays local:
  a stream only touches the `window_blocks` row groups of the current window.

* `Assignment`: the infinite sequence of global positions g = pass * N + position is split between the S
  streams (S = world_size * num_workers): stream s takes g = s, s + S, s + 2S, ... Every g is read by
  exactly one stream, so within a pass no row is read twice or skipped, whatever N mod S is. A world-size
  change adds a `Layer`: the positions the old streams had not consumed (their in-flight samples first,
  then the ragged gaps below the furthest old position M) are listed, then everything from M on; the new
  streams split that new sequence the same way. Layers are small: O(old streams + in-flight samples).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from . import rng

MAX_BLOCK_ROWS = 4096


class PassOrder:
    """Pass-k order over a group's rows: position p in [0, N) -> block index and offset in that block."""

    def __init__(self, block_lens: np.ndarray, key_parts: tuple, shuffle: bool, window_blocks: int) -> None:
        self.block_lens = np.asarray(block_lens, dtype=np.int64)
        self.n_blocks = len(self.block_lens)
        self.total = int(self.block_lens.sum())
        self.block_starts = np.concatenate([[0], np.cumsum(self.block_lens)[:-1]]).astype(np.int64)
        self.key_parts = key_parts
        self.shuffle = shuffle
        self.window = max(1, int(window_blocks))
        self._passes: OrderedDict[int, tuple] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _pass(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cached = self._passes.get(k)
        if cached is not None:
            self._passes.move_to_end(k)
            return cached
        order = rng.permutation(self.n_blocks, "blocks", *self.key_parts, k)
        cum = np.concatenate([[0], np.cumsum(self.block_lens[order])]).astype(np.int64)
        wstarts = cum[:: self.window]
        if wstarts[-1] != self.total:
            wstarts = np.concatenate([wstarts, [self.total]])
        cached = (order, cum, wstarts)
        self._passes[k] = cached
        if len(self._passes) > 3:
            self._passes.popitem(last=False)
        return cached

    def _window_perm(self, k: int, w: int, size: int) -> np.ndarray:
        perm = self._windows.get((k, w))
        if perm is None:
            perm = rng.permutation(size, "rows", *self.key_parts, k, w)
            self._windows[(k, w)] = perm
            if len(self._windows) > 8:
                self._windows.popitem(last=False)
        return perm

    def locate(self, k: int, p: int) -> tuple[int, int]:
        """(block, offset inside the block) of position p of pass k."""
        if not self.shuffle:
            b = int(np.searchsorted(self.block_starts, p, side="right")) - 1
            return b, int(p - self.block_starts[b])
        order, cum, wstarts = self._pass(k)
        w = int(np.searchsorted(wstarts, p, side="right")) - 1
        start = int(wstarts[w])
        perm = self._window_perm(k, w, int(wstarts[w + 1]) - start)
        q = start + int(perm[p - start])
        slot = int(np.searchsorted(cum, q, side="right")) - 1
        return int(order[slot]), int(q - cum[slot])


@dataclass
class Layer:
    """One world-size change: new virtual index v -> the previous layer's index."""

    inflight: list[int] = field(default_factory=list)      # released in-flight positions, first
    gaps: list[list[int]] = field(default_factory=list)    # [start, step, count] arithmetic runs, next
    tail: int = 0                                          # then tail, tail + 1, ...

    def __post_init__(self) -> None:
        counts = [len(self.inflight)] + [int(c) for _, _, c in self.gaps]
        self._cum = np.cumsum(counts).astype(np.int64)

    @property
    def n_holes(self) -> int:
        return int(self._cum[-1])

    def map(self, v: int) -> int:
        if v < len(self.inflight):
            return self.inflight[v]
        if v >= self.n_holes:
            return self.tail + (v - self.n_holes)
        i = int(np.searchsorted(self._cum, v, side="right"))   # gaps[i - 1]
        start, step, _ = self.gaps[i - 1]
        return int(start + (v - self._cum[i - 1]) * step)

    def to_state(self) -> dict:
        return {"inflight": list(self.inflight), "gaps": [list(g) for g in self.gaps], "tail": self.tail}

    @classmethod
    def from_state(cls, data: dict) -> "Layer":
        return cls([int(v) for v in data["inflight"]], [[int(x) for x in g] for g in data["gaps"]],
                   int(data["tail"]))


def to_global(layers: list[Layer], v: int) -> int:
    """The global position g of virtual index v of the newest layer."""
    for layer in reversed(layers):
        v = layer.map(v)
    return v


def reshard_layer(slots: int, cursors: list[int], inflight: list[int]) -> Layer:
    """The layer continuing a split over `slots` streams where stream s consumed its first cursors[s]
    positions (s, s + S, ...) of the newest layer, minus `inflight` ones (drawn but never trained)."""
    nexts = [s + c * slots for s, c in enumerate(cursors)]
    tail = max(nexts) if nexts else 0
    gaps = []
    for nxt in nexts:
        count = max(0, -(-(tail - nxt) // slots))
        if count:
            gaps.append([nxt, slots, count])
    return Layer(sorted(int(v) for v in inflight), gaps, tail)
