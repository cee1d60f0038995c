"""Pure order logic: pass permutations are bijections that change per pass; the split of positions over
streams, and its continuation after world-size changes, hands out every position exactly once."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from pipelines.mixture import rng
from pipelines.mixture.order import (Layer, PassOrder, chunk_size, layer_first, reshard_layer, stream_position,
                                     to_global)


def order_rows(order: PassOrder, k: int) -> list[int]:
    return [int(order.block_starts[b]) + off for b, off in (order.locate(k, p) for p in range(order.total))]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=12), st.integers(1, 20), st.integers(0, 10))
def test_pass_order_is_a_permutation_per_pass(lens, chunk, k):
    order = PassOrder(np.array(lens), (1, 0, "g", 0), True, chunk)
    rows = order_rows(order, k)
    assert sorted(rows) == list(range(sum(lens)))


def test_pass_order_changes_per_pass_and_is_local_to_windows():
    lens = np.full(40, 25)
    assert chunk_size(lens, 2) == 50
    order = PassOrder(lens, (3, 0, "g", 0), True, 50)
    a, b = order_rows(order, 0), order_rows(order, 1)
    assert a != b and sorted(a) == sorted(b)
    # the first window's 50 positions come from exactly 2 blocks (reads stay local)
    assert len({r // 25 for r in a[:50]}) == 2
    assert order_rows(PassOrder(lens, (3, 0, "g", 0), False, 50), 5) == list(range(1000))
    short = PassOrder(np.array([30, 7]), (3, 0, "g", 0), True, 10)
    assert short.span == 37 and short.split(36) == (0, 36) and short.split(38) == (1, 1)


def test_rng_is_stable_and_keyed():
    assert rng.key(1, "a", 2) == rng.key(1, "a", 2) != rng.key(1, "a", 3)
    assert rng.key(1, "a", 2) == 1605381013956693364   # pinned: the data order must not change between versions
    u = [rng.uniform(5, "x", i) for i in range(20000)]
    assert 0 <= min(u) and max(u) < 1 and abs(np.mean(u) - 0.5) < 0.01


def pos(layers, slots, rows, s, j):
    return stream_position(s, slots, rows, layer_first(layers), j)


def consumed(layers, slots, rows, cursors):
    """Global positions the streams took: stream s took its draws j < cursors[s]."""
    return [to_global(layers, pos(layers, slots, rows, s, j)) for s in range(slots) for j in range(cursors[s])]


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_reshard_chain_hands_out_every_position_exactly_once(data):
    layers: list[Layer] = []
    taken: list[int] = []
    rows = data.draw(st.integers(1, 13))
    slots = data.draw(st.integers(1, 5))
    for _ in range(data.draw(st.integers(1, 3))):
        cursors = data.draw(st.lists(st.integers(0, 12), min_size=slots, max_size=slots))
        drawn = {s: [to_global(layers, pos(layers, slots, rows, s, j)) for j in range(cursors[s])]
                 for s in range(slots)}
        # each stream still holds its last few draws in flight (buffer / pending): they go back to the pool
        inflight_v = []
        for s in range(slots):
            n = data.draw(st.integers(0, min(3, cursors[s])))
            for j in range(cursors[s] - n, cursors[s]):
                inflight_v.append(pos(layers, slots, rows, s, j))
            taken += drawn[s][: cursors[s] - n]
        layers = layers + [reshard_layer(slots, rows, layer_first(layers), cursors, inflight_v)]
        layers = [Layer.from_state(l.to_state()) for l in layers]        # through the state format
        slots = data.draw(st.integers(1, 5))
    horizon = 40
    final = [0] * slots
    # run the last topology until every stream has passed the horizon
    for s in range(slots):
        while to_global(layers, pos(layers, slots, rows, s, final[s])) < horizon + 200:
            final[s] += 1
    taken += consumed(layers, slots, rows, final)
    low = sorted(g for g in taken if g < horizon)
    assert low == list(range(horizon))


def test_plain_split_takes_contiguous_shares_and_covers_uneven_counts():
    for slots in (1, 2, 3, 7):
        for rows in (1, 3, 10):
            got = sorted(consumed([], slots, rows, [-(-rows // slots) + 1] * slots))
            assert got[:rows] == list(range(rows))
    # 10 rows over 3 streams: shares [0, 3), [3, 6), [6, 10) of every pass (hand-computed)
    assert [stream_position(1, 3, 10, 0, j) for j in range(5)] == [3, 4, 5, 13, 14]
    assert [stream_position(2, 3, 10, 0, j) for j in range(5)] == [6, 7, 8, 9, 16]
    # 2 rows over 3 streams: a round is 2 passes (4 positions): shares [0, 1), [1, 2), [2, 4)
    assert [stream_position(0, 3, 2, 0, j) for j in range(3)] == [0, 4, 8]
    assert [stream_position(2, 3, 2, 0, j) for j in range(3)] == [2, 3, 6]


@settings(max_examples=150, deadline=None)
@given(rows_per_block=st.lists(st.integers(1, 300), min_size=1, max_size=8), window=st.integers(1, 4),
       ranks=st.integers(1, 8), workers=st.integers(1, 4), k=st.integers(0, 3), seed=st.integers(0, 99))
def test_first_floor_n_over_s_draws_of_every_stream_in_a_pass_are_disjoint_and_cover(rows_per_block, window, ranks,
                                                                                     workers, k, seed):
    """For any row-group sizes and S = ranks x workers streams: in pass k the first floor(N/S) draws of every
    stream are distinct rows across all streams, floor(N/S) * S of them."""
    lens = np.array(rows_per_block)
    n, slots = int(lens.sum()), ranks * workers
    order = PassOrder(lens, (seed, 0, "g", 0), True, chunk_size(lens, window))
    per = n // slots
    rows_seen = []
    for s in range(slots):
        mine = []
        j = 0
        while len(mine) < per:
            g = to_global([], stream_position(s, slots, n, 0, j))
            j += 1
            pk, p = order.split(g)
            if pk == k:
                block, off = order.locate(pk, p)
                mine.append(int(order.block_starts[block]) + off)
            assert pk <= k, "a stream left pass k before drawing floor(N/S) rows of it"
        rows_seen += mine
    assert len(rows_seen) == per * slots == len(set(rows_seen))


def test_pass_boundaries_have_no_void_positions():
    # 10 rows in blocks of 4, 4, 2: a pass is exactly its 10 rows (the split across streams is by rows), so
    # global position 10 is the first row of pass 1 whatever the chunk size
    order = PassOrder(np.array([4, 4, 2]), (0, 0), shuffle=False, chunk=4)
    assert (order.total, order.span) == (10, 10)
    assert [order.split(u) for u in (0, 9, 10, 19, 20, 29, 30)] == \
        [(0, 0), (0, 9), (1, 0), (1, 9), (2, 0), (2, 9), (3, 0)]
    # unshuffled, position p is row p: block 0 holds rows 0-3, block 1 rows 4-7, block 2 rows 8-9
    assert [order.locate(0, p) for p in (0, 3, 4, 7, 8, 9)] == [(0, 0), (0, 3), (1, 0), (1, 3), (2, 0), (2, 1)]


def test_chunk_size_is_window_blocks_median_blocks():
    assert chunk_size(np.array([4, 4, 2]), 3) == 12          # 3 x median 4
    assert chunk_size(np.array([1, 9, 9, 9]), 2) == 18       # median 9 (numpy median of 1, 9, 9, 9)
    assert chunk_size(np.array([], dtype=np.int64), 5) == 1  # no blocks: 1
    assert chunk_size(np.array([3]), 0) == 1                 # never below 1


def _reference_rows(lens: list[int], key: tuple, chunk: int, k: int) -> list[int]:
    """The documented order of pass k written out directly: blocks permuted by the ("blocks", *key, k) stream,
    their rows concatenated, then positions permuted inside each window of `chunk` by ("rows", *key, k, w)."""
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    blocks = rng.permutation(len(lens), "blocks", *key, k)
    rows = [int(starts[b]) + i for b in blocks for i in range(lens[b])]
    out = []
    for w, start in enumerate(range(0, len(rows), chunk)):
        size = min(chunk, len(rows) - start)
        perm = rng.permutation(size, "rows", *key, k, w)
        out.extend(rows[start + int(q)] for q in perm)
    return out


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=8), st.integers(1, 7), st.integers(0, 3))
def test_pass_order_is_the_documented_composition(lens, chunk, k):
    key = (7, 0, "g", 1)
    order = PassOrder(np.array(lens), key, True, chunk)
    assert order_rows(order, k) == _reference_rows(lens, key, chunk, k)


def test_caches_keep_the_most_recent_passes_and_windows():
    # memory stays O(blocks) per cached pass: at most 3 passes and 8 windows, the most recently used
    order = PassOrder(np.full(12, 2), (1, 0, "g", 0), True, 2)
    for k in range(5):
        order.locate(k, 0)
    assert list(order._passes) == [2, 3, 4]
    for p in range(0, 24, 2):          # 12 windows of pass 4
        order.locate(4, p)
    assert list(order._windows) == [(4, w) for w in range(4, 12)]
    order.locate(2, 0)                 # a hit moves pass 2 to the end
    order.locate(5, 0)
    assert list(order._passes) == [4, 2, 5]


def test_chunk_of_one_and_integer_block_lengths():
    one = PassOrder([3, 2], (0, 0), shuffle=False, chunk=1)
    assert (one.chunk, one.span, one.total) == (1, 5, 5) and one.split(5) == (1, 0)
    assert PassOrder([3, 2], (0, 0), shuffle=False, chunk=0).chunk == 1
    assert one.block_starts.tolist() == [0, 3]


def test_split_of_an_empty_group_is_none():
    # the docstring's promise: a group with no rows has no (pass, position) for any global position (it used
    # to raise ZeroDivisionError in divmod); a one-row group puts global position u at pass u, position 0
    empty = PassOrder(np.array([], dtype=np.int64), (0, 0), shuffle=False, chunk=4)
    assert (empty.total, empty.span) == (0, 0)
    assert [empty.split(u) for u in (0, 1, 7)] == [None, None, None]
    one = PassOrder(np.array([1]), (0, 0), shuffle=True, chunk=4)
    assert [one.split(u) for u in (0, 1, 5)] == [(0, 0), (1, 0), (5, 0)]
