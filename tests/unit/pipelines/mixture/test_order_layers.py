"""The world-size-change arithmetic of pipelines/mixture/order.py with every number worked out by hand: where
a stream's j-th draw lands, how a layer maps its indexes, and the layer a reshard builds. Fast and deterministic
(the property test of the whole reshard chain is in test_mixture_order.py).

Shares of a round of length L over S streams: stream s takes [floor(s L / S), floor((s + 1) L / S)). For 10
rows and 3 streams: s0 [0, 3), s1 [3, 6), s2 [6, 10).
"""
from __future__ import annotations

import pytest

from pipelines.mixture.order import Layer, layer_first, reshard_layer, round_length, round_start, stream_position, \
    stream_round, to_global


@pytest.mark.parametrize("rows, slots, length", [(10, 3, 10), (2, 5, 6), (3, 3, 3), (3, 4, 6), (1, 1, 1), (0, 2, 0)])
def test_round_length_is_whole_passes_enough_for_every_stream(rows, slots, length):
    # ceil(slots / rows) passes when rows < slots: 2 rows, 5 streams -> 3 passes of 2 = 6
    assert round_length(rows, slots) == length


@pytest.mark.parametrize("slot, j, position", [
    (1, 0, 3), (1, 2, 5), (1, 3, 13), (1, 7, 24),   # s1: 3, 4, 5 | 13, 14, 15 | 23, 24 (7 = 2 * 3 + 1)
    (2, 3, 9), (2, 5, 17),                          # s2: 6..9 | 16..19 (5 = 4 + 1)
    (0, 0, 0), (0, 4, 11),                          # s0: 0..2 | 10..12
])
def test_stream_position_without_holes(slot, j, position):
    assert stream_position(slot, 3, 10, 0, j) == position


@pytest.mark.parametrize("slot, j, position", [
    # round 0 = 5 holes split 3 ways: s0 [0, 1), s1 [1, 3), s2 [3, 5); round r >= 1 starts at 5 + 10 (r - 1)
    (0, 0, 0), (0, 1, 5), (0, 3, 7), (0, 4, 15),
    (1, 0, 1), (1, 1, 2), (1, 2, 8), (1, 5, 18),
    (2, 0, 3), (2, 1, 4), (2, 2, 11), (2, 6, 15 + 6),
])
def test_stream_position_after_a_reshard(slot, j, position):
    assert stream_position(slot, 3, 10, 5, j) == position


def test_stream_round_and_round_start_by_hand():
    assert stream_round(1, 3, 10, 5, 1) == (0, 1)      # still in round 0 (2 holes: offsets 0, 1)
    assert stream_round(1, 3, 10, 5, 2) == (1, 0)
    assert stream_round(2, 3, 10, 0, 5) == (2, 1)      # no holes: round 1 is the first pass
    assert [round_start(3, 10, 5, r) for r in range(4)] == [0, 5, 15, 25]
    assert [round_start(3, 10, 0, r) for r in range(3)] == [0, 0, 10]


@pytest.mark.parametrize("slot, j, position", [(4, 1, 5), (4, 2, 10), (0, 1, 6), (3, 0, 3), (2, 4, 26)])
def test_stream_position_with_fewer_rows_than_streams(slot, j, position):
    # 2 rows, 5 streams: rounds of 6 (3 passes), shares s0 [0,1) s1 [1,2) s2 [2,3) s3 [3,4) s4 [4,6)
    assert stream_position(slot, 5, 2, 0, j) == position


LAYER = Layer(inflight=[7, 3], runs=[[10, 5, 2, 3], [40, 1, 1, 4]], tail=100)
# holes: 2 in flight, then 2 x 3 from 10 with step 5 (10 11 12 15 16 17), then 4 from 40; 12 in all


@pytest.mark.parametrize("v, mapped", [(0, 7), (1, 3), (2, 10), (3, 11), (4, 12), (5, 15), (7, 17), (8, 40),
                                       (11, 43), (12, 100), (15, 103)])
def test_layer_maps_inflight_then_runs_then_tail(v, mapped):
    assert LAYER.n_holes == 12
    assert LAYER.map(v) == mapped


def test_layer_state_round_trip_and_an_empty_layer():
    state = LAYER.to_state()
    assert state == {"inflight": [7, 3], "runs": [[10, 5, 2, 3], [40, 1, 1, 4]], "tail": 100}
    again = Layer.from_state({"inflight": ["7", 3.0], "runs": [["10", 5, 2, 3], [40, 1, 1, 4.0]], "tail": "100"})
    assert again.to_state() == state and all(type(x) is int for x in again.inflight + again.runs[0] + [again.tail])
    assert [again.map(v) for v in range(16)] == [LAYER.map(v) for v in range(16)]
    state["inflight"].append(99)
    state["runs"][0][0] = 0
    assert LAYER.inflight == [7, 3] and LAYER.runs[0][0] == 10        # the state is a copy
    empty = Layer()
    assert empty.n_holes == 0 and empty.map(5) == 5


def test_to_global_applies_the_newest_layer_first():
    newest = Layer([5], [], 0)                  # v 0 -> 5, v >= 1 -> v - 1
    assert to_global([LAYER, newest], 0) == LAYER.map(5) == 15
    assert to_global([LAYER, newest], 1) == LAYER.map(0) == 7
    assert to_global([LAYER, newest], 14) == LAYER.map(13) == 101
    assert to_global([], 9) == 9
    assert layer_first([]) == 0 and layer_first([newest, LAYER]) == 12 and layer_first([LAYER, newest]) == 1


def _holes(layer: Layer) -> list[int]:
    return [layer.map(v) for v in range(layer.n_holes)]


def test_reshard_layer_collects_the_untrained_rest_of_the_touched_rounds():
    # 10 rows, 3 streams, no holes; s0 drew 0 1 | s1 3 4 5 | s2 6 7 8 9 16 (5 draws: round 2 offset 1);
    # positions 4 and 1 were in flight (drawn, never trained). Rounds touched: up to round 2 (positions 0..19).
    layer = reshard_layer(3, 10, 0, [2, 3, 5], [4, 1])
    assert layer.to_state() == {"inflight": [1, 4],
                                "runs": [[2, 1, 1, 1], [10, 10, 1, 3], [13, 1, 1, 3], [17, 1, 1, 3]], "tail": 20}
    assert _holes(layer) == [1, 4, 2, 10, 11, 12, 13, 14, 15, 17, 18, 19]
    assert layer.map(12) == 20


def test_reshard_layer_when_one_stream_ran_ahead():
    # s0 drew 7: 0 1 2 | 10 11 12 | 20 (round 3 offset 1); s1 and s2 drew nothing: their shares of rounds 1..3
    # are holes, runs of 3 (s1) and 4 (s2) positions every 10
    layer = reshard_layer(3, 10, 0, [7, 0, 0], [])
    assert layer.to_state()["runs"] == [[21, 1, 1, 2], [3, 1, 1, 3], [13, 10, 2, 3], [6, 1, 1, 4], [16, 10, 2, 4]]
    assert layer.tail == 30
    assert sorted(_holes(layer)) == sorted(set(range(30)) - {0, 1, 2, 10, 11, 12, 20})


def test_reshard_layer_over_a_layer_with_holes():
    # 5 holes in round 0 over 2 streams: s0 [0, 2), s1 [2, 5); rounds of 10 from 5: s0 [5, 10), s1 [10, 15).
    # s0 drew 0; s1 drew 2 3 4 | 10. Untrained up to round 1: 1, 5..9, 11..14
    layer = reshard_layer(2, 10, 5, [1, 4], [])
    assert layer.to_state() == {"inflight": [], "runs": [[1, 1, 1, 1], [5, 10, 1, 5], [11, 1, 1, 4]], "tail": 15}


def test_reshard_layer_with_nothing_drawn():
    assert reshard_layer(3, 10, 0, [0, 0, 0], []).to_state() == {"inflight": [], "runs": [], "tail": 0}
    assert reshard_layer(3, 10, 0, [], []).to_state() == {"inflight": [], "runs": [], "tail": 0}
    # every stream exactly at the end of round 1: nothing left in it, the tail starts at round 2
    assert reshard_layer(3, 10, 0, [3, 3, 4], []).to_state() == {"inflight": [], "runs": [], "tail": 10}


def test_reshard_layer_with_no_streams_keeps_every_position():
    # no stream drew anything from a layer with 5 holes: the new layer is the old one unchanged (tail 0)
    assert reshard_layer(3, 10, 5, [], []).to_state() == {"inflight": [], "runs": [], "tail": 0}
