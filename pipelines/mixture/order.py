"""Where the j-th draw of a stream lands: pass permutations and the split of passes across streams.

Two pure, integer-only pieces (no I/O, no state beyond small caches):

* `PassOrder`: the order of a group's rows in pass k. Blocks (row groups, at most MAX_BLOCK_ROWS rows)
  are permuted, then rows are permuted inside each window of `chunk` consecutive positions (about
  `shuffle_window_blocks` row groups). Keys come from the counter-based RNG (seed, epoch, group,
  shuffle_seed, pass), so the order changes every pass and is the same on every machine. Memory:
  O(blocks) per cached pass, never O(rows).

* The split across streams, by rows. Pass k occupies positions u = k * rows + p of an infinite
  sequence (no void positions). The sequence is cut into rounds (a round is one pass, or
  ceil(S / rows) passes when a group has fewer rows than streams), and stream s of S (S = world_size *
  num_workers) takes the contiguous share [floor(s * L / S), floor((s + 1) * L / S)) of every round of
  length L, in order. So the first floor(rows / S) draws of every stream in a pass are distinct across
  streams and cover floor(rows / S) * S rows, whatever the row-group size, and a stream reads its share
  window by window (large groups: every row group is read by one stream, two at share edges).
  A world-size change adds a `Layer`: the positions the old streams had not trained on (their in-flight
  samples, the rest of their shares of the rounds up to the furthest one any old stream touched), then
  everything from the next round on; in the new layer those holes form round 0 and the rest follows in
  rounds as above. Layers are O(old streams + in-flight).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from pipelines.mixture import rng

MAX_BLOCK_ROWS = 4096


def chunk_size(block_lens: np.ndarray, window_blocks: int) -> int:
    """Positions per window/chunk: `window_blocks` typical (median) row groups, at least 1."""
    if len(block_lens) == 0:
        return 1
    return max(1, int(window_blocks) * int(np.median(block_lens)))


class PassOrder:
    """Pass-k order over a group's rows: position p in [0, N) -> block index and offset in that block."""

    def __init__(self, block_lens: np.ndarray, key_parts: tuple, shuffle: bool, chunk: int) -> None:
        self.block_lens = np.asarray(block_lens, dtype=np.int64)
        self.n_blocks = len(self.block_lens)
        self.total = int(self.block_lens.sum())
        self.block_starts = np.concatenate([[0], np.cumsum(self.block_lens)[:-1]]).astype(np.int64)
        self.key_parts = key_parts
        self.shuffle = shuffle
        self.chunk = max(1, int(chunk))
        self.span = self.total   # positions per pass (the split is by rows: no void positions)
        self._passes: OrderedDict[int, tuple] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _pass(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._passes.get(k)
        if cached is not None:
            self._passes.move_to_end(k)
            return cached
        order = rng.permutation(self.n_blocks, "blocks", *self.key_parts, k)
        cum = np.concatenate([[0], np.cumsum(self.block_lens[order])]).astype(np.int64)
        self._passes[k] = (order, cum)
        if len(self._passes) > 3:
            self._passes.popitem(last=False)
        return order, cum

    def _window_perm(self, k: int, w: int, size: int) -> np.ndarray:
        perm = self._windows.get((k, w))
        if perm is None:
            perm = rng.permutation(size, "rows", *self.key_parts, k, w)
            self._windows[(k, w)] = perm
            if len(self._windows) > 8:
                self._windows.popitem(last=False)
        return perm

    def locate(self, k: int, p: int) -> tuple[int, int]:
        """(block, offset inside the block) of position p (< total) of pass k."""
        if not self.shuffle:
            b = int(np.searchsorted(self.block_starts, p, side="right")) - 1
            return b, int(p - self.block_starts[b])
        order, cum = self._pass(k)
        w, start = p // self.chunk, (p // self.chunk) * self.chunk
        perm = self._window_perm(k, w, min(self.chunk, self.total - start))
        q = start + int(perm[p - start])
        slot = int(np.searchsorted(cum, q, side="right")) - 1
        return int(order[slot]), int(q - cum[slot])

    def split(self, u: int) -> tuple[int, int] | None:
        """(pass, position) of global position u (None only for an empty group)."""
        if not self.span:   # an empty group: no pass has a position (divmod by 0 otherwise)
            return None
        k, p = divmod(u, self.span)
        return k, p


def round_length(rows: int, slots: int) -> int:
    """Positions per round: one pass, or whole passes enough to give every stream at least one."""
    return rows * max(1, -(-slots // max(1, rows)))


def _share(length: int, slots: int, slot: int) -> tuple[int, int]:
    return slot * length // slots, (slot + 1) * length // slots


def stream_round(slot: int, slots: int, rows: int, first: int, j: int) -> tuple[int, int]:
    """(round, offset in this stream's share of it) of the j-th draw of stream `slot` of `slots`; round 0
    has `first` positions (the holes of a resharded layer, 0 otherwise), later rounds `round_length`."""
    a, b = _share(first, slots, slot)
    if j < b - a:
        return 0, j
    j -= b - a
    a, b = _share(round_length(rows, slots), slots, slot)
    r, o = divmod(j, b - a)
    return r + 1, o


def round_start(slots: int, rows: int, first: int, r: int) -> int:
    """Position (in the layer) where round r begins."""
    return 0 if r == 0 else first + (r - 1) * round_length(rows, slots)


def stream_position(slot: int, slots: int, rows: int, first: int, j: int) -> int:
    """The position (in the newest layer) of the j-th draw of stream `slot` of `slots`."""
    r, o = stream_round(slot, slots, rows, first, j)
    length = first if r == 0 else round_length(rows, slots)
    return round_start(slots, rows, first, r) + _share(length, slots, slot)[0] + o


@dataclass
class Layer:
    """One world-size change: new virtual index v -> the previous layer's index."""

    inflight: list[int] = field(default_factory=list)      # released in-flight positions, first
    runs: list[list[int]] = field(default_factory=list)    # [start, step, count, length], next
    tail: int = 0                                          # then tail, tail + 1, ...

    def __post_init__(self) -> None:
        counts = [len(self.inflight)] + [int(c) * int(n) for _, _, c, n in self.runs]
        self._cum = np.cumsum(counts).astype(np.int64)

    @property
    def n_holes(self) -> int:
        return int(self._cum[-1])

    def map(self, v: int) -> int:
        if v < len(self.inflight):
            return self.inflight[v]
        if v >= self.n_holes:
            return self.tail + (v - self.n_holes)
        i = int(np.searchsorted(self._cum, v, side="right"))   # runs[i - 1]
        start, step, _, length = self.runs[i - 1]
        idx = int(v - self._cum[i - 1])
        return int(start + (idx // length) * step + idx % length)

    def to_state(self) -> dict:
        return {"inflight": list(self.inflight), "runs": [list(r) for r in self.runs], "tail": self.tail}

    @classmethod
    def from_state(cls, data: dict) -> "Layer":
        return cls([int(v) for v in data["inflight"]], [[int(x) for x in r] for r in data["runs"]],
                   int(data["tail"]))


def to_global(layers: list[Layer], v: int) -> int:
    """The global position of virtual index v of the newest layer."""
    for layer in reversed(layers):
        v = layer.map(v)
    return v


def layer_first(layers: list[Layer]) -> int:
    """Length of round 0 of the newest layer: its holes (0 without a world-size change)."""
    return layers[-1].n_holes if layers else 0


def reshard_layer(slots: int, rows: int, first: int, cursors: list[int], inflight: list[int]) -> Layer:
    """The layer continuing a split over `slots` streams in which stream s made cursors[s] draws
    (positions `stream_position(s, slots, rows, first, j)`, j < cursors[s], of the newest layer), minus
    `inflight` ones (drawn but never trained). Every stream's untrained rest of the rounds up to the
    furthest round any stream touched becomes a hole; the tail starts at the next round, which begins a
    pass."""
    where = [stream_round(s, slots, rows, first, j) for s, j in enumerate(cursors)]
    top = max((r + (1 if o else 0) for r, o in where), default=0)   # rounds touched: 0 .. top - 1
    length = round_length(rows, slots)
    runs = []
    for s, (r, o) in enumerate(where):
        if r >= top:
            continue
        a, b = _share(first if r == 0 else length, slots, s)
        if b - a - o > 0:   # the rest of the share of the round the stream is in
            runs.append([round_start(slots, rows, first, r) + a + o, 1, 1, b - a - o])
        count = top - 1 - r                       # whole shares of the later touched rounds (all >= 1)
        if count > 0:
            a, b = _share(length, slots, s)
            runs.append([round_start(slots, rows, first, r + 1) + a, length, count, b - a])
    return Layer(sorted(int(v) for v in inflight), runs, round_start(slots, rows, first, top))
