"""Curriculum stages: parsing and refusals, weights by optimizer step, the switch at a boundary and exact
resume across it, and the step count carried through a world-size change."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from datasets_catalog.tokenizer import TextTokenizer
from pipelines.mixture.config import MixtureConfig, MixtureConfigError
from pipelines.mixture.stages import stage_index
from pipelines.mixture.stream import MixtureStream, merge_states
from pipelines.packing.config import PackingConfig
from tests.helpers.shard_factory import make_catalog, tiny, write_config

PACKING = PackingConfig(expected_num_tokens=1024, max_num_tokens=1280, max_num_tokens_per_sample=1024,
                        prefer_buffer_before=512, max_buffer_size=4)
TWO = """
sft: {dataset_names: [vqa], weight: 1}
text_only: {dataset_names: [txt], weight: 1}
stages:
  - {name: first, until_step: 6, weight: {sft: 3, text_only: 1}}
  - {name: second, until_step: 12, weight: {sft: 1, text_only: 3}}
"""


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    return make_catalog(root, [tiny("vqa", "sft", 40), tiny("txt", "text_only", 30)])


def cfg(catalog, body: str, name: str = "mix.yaml") -> MixtureConfig:
    return MixtureConfig.from_yaml(write_config(catalog.parent / name, f"catalog: {catalog}\n{body}"))


def test_parsed_stages_fill_unnamed_groups_and_pause_with_zero(catalog):
    c = cfg(catalog, """
sft: {dataset_names: [vqa], weight: 2}
text_only: {dataset_names: [txt], weight: 2}
stages:
  - {until_step: 5, weight: {sft: 1}}
  - {name: text, until_step: 9, weight: {SftJSONLIterableDataset_Ver1: 0}}
""")
    assert [(s.name, s.until_step, s.weights) for s in c.stages] == [("stage1", 5, (1.0, 2.0)), ("text", 9, (0.0, 2.0))]
    assert c.weights(0) == pytest.approx([1 / 3, 2 / 3]) and c.weights(4) == pytest.approx([1 / 3, 2 / 3])
    assert c.weights(5) == [0.0, 1.0] and c.weights(100) == [0.0, 1.0]   # past the end: the last stage


@pytest.mark.parametrize("stages,match", [
    ("[{until_step: 5, weight: {sft: .nan}}]", r"line 5: stages\[1\]\.weight\[sft\] must be a finite number"),
    ("[{until_step: 5, weight: {sft: .inf}}]", "must be a finite number"),
    ("[{until_step: 5, weight: {sft: lots}}]", "must be a finite number"),
    ("[{until_step: 5, weight: {sfft: 1}}]", "names group 'sfft'.*did you mean 'sft'"),
    ("[{until_step: 5}, {until_step: 5}]", r"stages\[2\]\.until_step must be a whole number greater than"),
    ("[{until_step: 0}]", r"stages\[1\]\.until_step"),
    ("[{until_step: 5, weight: {sft: 0, text_only: 0}}]", "all group weights are zero in this stage"),
    ("[{until_step: 5, wieght: {sft: 1}}]", "unknown field 'wieght'.*did you mean 'weight'"),
    ("{until_step: 5}", "stages must be a non-empty list"),
])
def test_bad_stages_are_refused_with_file_and_line(catalog, stages, match):
    with pytest.raises(MixtureConfigError, match=match) as exc:
        cfg(catalog, f"sft: {{dataset_names: [vqa]}}\ntext_only: {{dataset_names: [txt]}}\nstages:\n  {stages}\n",
            "bad.yaml")
    assert "bad.yaml" in str(exc.value) and "\n" not in str(exc.value)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=5, unique=True), st.integers(0, 300))
def test_stage_index_matches_the_boundaries(bounds, step):
    from pipelines.mixture.stages import Stage

    bounds = sorted(bounds)
    stages = tuple(Stage(f"s{i}", b, (1.0,)) for i, b in enumerate(bounds))
    expected = next((i for i, b in enumerate(bounds) if step < b), len(bounds) - 1)   # the documented rule
    assert stage_index(stages, step) == expected


def _draws(stream: MixtureStream, packs: int) -> list[tuple[int, str]]:
    out = []
    for _ in range(packs):
        plan = stream.next_plan()
        out += [(plan.metrics["step"], m.sample.dataset) for m in plan.members]
    return out


def test_stream_switches_at_the_boundary_by_optimizer_step(catalog):
    c = cfg(catalog, TWO, "two.yaml")
    tok = TextTokenizer.builtin()
    # 2 loader workers x gradient accumulation 2: worker 1's pack p feeds step (2p + 1) // 2 = p
    s = MixtureStream(c, PACKING, tok, rank=0, world_size=1, worker_id=1, num_workers=2, grad_accum=2)
    plans = [s.next_plan() for _ in range(12)]
    assert [p.metrics["step"] for p in plans] == list(range(12))
    assert [p.metrics["stage"] for p in plans] == [0] * 6 + [1] * 6
    first = [m.sample.dataset for p in plans[:6] for m in p.members]
    second = [m.sample.dataset for p in plans[6:] for m in p.members]
    assert first.count("vqa") > first.count("txt") and second.count("txt") > second.count("vqa")


def test_resume_across_the_boundary_equals_the_uninterrupted_stream(catalog):
    c = cfg(catalog, TWO, "two.yaml")
    tok = TextTokenizer.builtin()
    full = MixtureStream(c, PACKING, tok, rank=1, world_size=2)
    whole = [[m.sample.sample_id for m in full.next_plan().members] for _ in range(10)]
    first = MixtureStream(c, PACKING, tok, rank=1, world_size=2)
    head = [[m.sample.sample_id for m in first.next_plan().members] for _ in range(4)]   # stopped in stage 1
    state = json.loads(json.dumps(first.state_dict()))
    again = MixtureStream(c, PACKING, tok, rank=1, world_size=2)
    again.load_state_dict(state)
    tail = [[m.sample.sample_id for m in again.next_plan().members] for _ in range(6)]  # resumed into stage 2
    assert head + tail == whole


def test_world_size_change_keeps_the_optimizer_step(catalog):
    c = cfg(catalog, TWO, "two.yaml")
    tok = TextTokenizer.builtin()
    # 2 ranks x 2 workers, 5 optimizer steps of 1 pack each: worker 0 made 3 packs, worker 1 made 2 (per rank)
    old = [MixtureStream(c, PACKING, tok, rank=r, world_size=2, worker_id=w, num_workers=2)
           for r in range(2) for w in range(2)]
    states = []
    for s in old:
        for _ in range(3 if s.worker_id == 0 else 2):
            s.next_plan()
        states.append(s.state_dict())
    assert merge_states(states)["step_offset"] == 5
    new = MixtureStream(c, PACKING, tok, rank=0, world_size=3)
    new.load_state_dict(states)
    assert [new.next_plan().metrics["step"] for _ in range(2)] == [5, 6]


@settings(max_examples=80, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.text(max_size=3),
                 st.booleans(), st.none()))
def test_any_weight_is_accepted_only_when_finite_and_not_negative(value):
    """Group weights and stage weights: finite numbers >= 0 pass, anything else is one refusal naming the field."""
    import math

    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0)
    for raw in ({"sft": {"dataset_names": ["a"], "weight": value}, "t2i": {"dataset_names": ["b"], "weight": 1}},
                {"sft": {"dataset_names": ["a"]}, "t2i": {"dataset_names": ["b"]},
                 "stages": [{"until_step": 3, "weight": {"sft": value}}]}):
        if ok:
            MixtureConfig.from_dict(raw, "w.yaml")
        else:
            with pytest.raises(MixtureConfigError, match=r"w\.yaml.*weight.*must be a finite number >= 0"):
                MixtureConfig.from_dict(raw, "w.yaml")
