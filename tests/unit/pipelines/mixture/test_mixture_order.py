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
