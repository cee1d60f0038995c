"""Record parsing and validation per task kind (datasets_catalog.records), unit and property tests."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from datasets_catalog.plan import PLAN_BUILDERS
from datasets_catalog.records import REASONS, RecordError, check_length, decode_line, parse_record
from datasets_catalog.task_kinds import TASK_KINDS, resolve_task_kind


def msgs(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def img(path="a.png", **kw):
    return {"path": path, **kw}


def reason_of(obj, kind):
    with pytest.raises(RecordError) as info:
        parse_record(obj, resolve_task_kind(kind))
    return info.value.reason


VALID = {
    "sft": {"input_img": [img()], "message": msgs("<image>\nWhat is shown?", "A chest CT.")},
    "text_only": {"message": msgs("What is HU?", "Hounsfield units.")},
    "sft_recon_v1": {"input_img": [img()], "message": msgs("<image> Describe.", "A slice.")},
    "sft_recon_v2": {"input_img": [img()], "message": msgs("<image> Describe.", "A slice.")},
    "t2i": {"output_img": [img()], "message": msgs("A fundus photograph.")},
    "edit": {"input_img": [img()], "output_img": [img("b.png")], "message": msgs("<image> To IHC.", "Done.")},
    "counterfactual": {"input_img": [img()], "output_img": [img("b.png")],
                       "message": msgs("<image> Without effusion?", "Effusion removed.")},
    "vlm_sft": {"image": "a.png", "conversations": msgs("<image>\nNormal?", "Yes.")},
}


def test_every_kind_has_a_valid_example():
    assert set(VALID) == {k.name for k in TASK_KINDS}
    for name, obj in VALID.items():
        record = parse_record(obj, resolve_task_kind(name))
        assert record.plan.has_loss


def test_plan_shapes():
    sft = parse_record(VALID["sft"], resolve_task_kind("sft"))
    assert [i.type for i in sft.plan.items] == ["vit_image", "text", "text"]
    recon = parse_record(VALID["sft_recon_v2"], resolve_task_kind("sft_recon_v2"))
    assert [i.type for i in recon.plan.items][-1] == "vae_image" and recon.plan.items[-1].loss == 1
    edit = parse_record(VALID["edit"], resolve_task_kind("edit"))
    assert [(i.type, i.loss) for i in edit.plan.items] == [
        ("vae_image", 0), ("vit_image", 0), ("text", 0), ("text", 1), ("vae_image", 1)]
    cf = parse_record(VALID["counterfactual"], resolve_task_kind("counterfactual"))
    assert [(i.type, i.loss) for i in cf.plan.items] == [
        ("vae_image", 0), ("vit_image", 0), ("text", 0), ("vae_image", 1), ("text", 1)]


@pytest.mark.parametrize("kind", TASK_KINDS, ids=lambda k: k.name)
def test_task_kind_fields_agree_with_its_plan(kind):
    """The facts a TaskKind states about its samples hold for its valid example's plan."""
    assert kind.plan in PLAN_BUILDERS
    plan = parse_record(VALID[kind.name], kind).plan.items
    vit = [i for i in plan if i.type == "vit_image"]
    assert bool(vit) == kind.vit_context
    assert all(i.enable_cfg == int(kind.vit_cfg_dropout) for i in vit)
    assert kind.always_vit == any(i.enable_cfg == 0 for i in vit)
    assert any(i.type == "vae_image" and i.loss == 0 for i in plan) == kind.vae_context
    assert any(i.type == "vae_image" and i.loss == 1 for i in plan) == kind.generation


def test_always_vit_kinds():
    assert {k.name for k in TASK_KINDS if k.always_vit} == {
        "sft_recon_v1", "sft_recon_v2", "edit", "counterfactual", "vlm_sft"}


def test_max_content_tokens_rejects_long_samples():
    kind = resolve_task_kind("counterfactual")
    check_length(kind, 18000 + 2 * 5, 5)
    with pytest.raises(RecordError) as err:
        check_length(kind, 18001 + 2 * 5, 5)
    assert err.value.reason == "too_long" and "18000" in err.value.detail
    check_length(resolve_task_kind("edit"), 10 ** 6, 5)   # no limit


def test_unknown_fields_are_kept():
    obj = {**VALID["sft"], "id": 7, "source": "x", "input_img": [img(width=3, height=4, modality="CT")]}
    record = parse_record(obj, resolve_task_kind("sft"))
    assert record.extra["id"] == 7 and record.extra["source"] == "x"
    assert record.extra["_input_img_fields"] == [{"modality": "CT"}]
    assert record.input_images[0].width == 3 and record.input_images[0].height == 4


def test_single_dict_and_string_images():
    record = parse_record({**VALID["sft"], "input_img": img()}, resolve_task_kind("sft"))
    assert [i.path for i in record.input_images] == ["a.png"]
    record = parse_record({"image": ["a.png", "b.png"], "conversations": msgs("<image><image> Same?", "No.")},
                          resolve_task_kind("vlm_sft"))
    assert len(record.input_images) == 2


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "json_invalid"),
    (b"\xff\xfe{}", "not_utf8"),
    (b"[1, 2]", "not_object"),
    (b'"text"', "not_object"),
])
def test_decode_line_reasons(raw, reason):
    with pytest.raises(RecordError) as info:
        decode_line(raw)
    assert info.value.reason == reason


@pytest.mark.parametrize("kind, obj, reason", [
    ("sft", {"input_img": [img()]}, "field_missing"),
    ("sft", {"input_img": [img()], "message": "hi"}, "field_type"),
    ("sft", {"input_img": [img()], "message": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
     "field_type"),
    ("sft", {"input_img": [img()], "message": [{"from": "user", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
     "message_role"),
    ("sft", {"input_img": [{"width": 3}], "message": msgs("<image>", "x")}, "field_missing"),
    ("sft", {"input_img": [img(width="3")], "message": msgs("<image>", "x")}, "field_type"),
    ("sft", {"input_img": [img(path=5)], "message": msgs("<image>", "x")}, "field_type"),
    ("sft", {"input_img": 3, "message": msgs("<image>", "x")}, "field_type"),
    ("sft", {"message": msgs("<image> What?", "x")}, "image_count"),
    ("sft", {"input_img": [img()], "message": msgs("What?", "x")}, "image_tag_mismatch"),
    ("sft", {"input_img": [img()], "message": msgs("<image><image> What?", "x")}, "image_tag_mismatch"),
    ("sft", {"input_img": [img()], "message": msgs("<image> What?", "<image> x")}, "image_tag_mismatch"),
    ("sft", {"input_img": [img()], "message": msgs("<image> What?", "")}, "no_loss_target"),
    ("sft", {"input_img": [img()], "message": [{"from": "human", "value": "<image>"}] * 2}, "no_loss_target"),
    ("sft", {"input_img": [img()], "message": msgs("<image>")}, "field_missing"),
    ("vlm_sft", {"image": ["a.png", "b.png"], "conversations": msgs("<image> What?", "x")}, "image_tag_mismatch"),
    ("vlm_sft", {"conversations": msgs("<image> What?", "x")}, "field_missing"),
    ("vlm_sft", {"video": "v.mp4", "conversations": msgs("<video> What?", "x")}, "field_missing"),
    ("t2i", {"message": msgs("A picture.")}, "image_count"),
    ("t2i", {"output_img": [img()], "message": msgs("<image> A picture.")}, "image_tag_mismatch"),
    ("t2i", {"output_img": [img()], "message": []}, "field_missing"),
    ("edit", {"input_img": [img()], "message": msgs("<image> To IHC.", "x")}, "image_count"),
    ("edit", {"input_img": [img()], "output_img": [img()], "message": msgs("<image><image> To IHC.", "x")},
     "image_tag_mismatch"),
    ("counterfactual", {"output_img": [img()], "message": msgs("<image> x", "y")}, "image_count"),
])
def test_bad_records(kind, obj, reason):
    assert reason_of(obj, kind) == reason


def test_text_only_ignores_images_and_tags():
    obj = {"input_img": [img()], "message": msgs("<image>  What   is HU?", "Hounsfield units.")}
    record = parse_record(obj, resolve_task_kind("text_only"))
    assert record.images == [] and "input_img" in record.extra
    assert record.plan_texts == ["What is HU?", "Hounsfield units."]


# -- property tests --------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
field_values = st.one_of(json_values, st.just("<image> hi"), st.just([{"from": "human", "value": "<image>"}]),
                         st.just([{"path": "a.png"}]))
records = st.dictionaries(st.sampled_from(["input_img", "output_img", "message", "image", "conversations",
                                           "id", "video"]), field_values, max_size=5)


@settings(max_examples=300, deadline=None)
@given(obj=records, kind=st.sampled_from([k.name for k in TASK_KINDS]))
def test_validator_never_crashes(obj, kind):
    """Any JSON object either parses into a record with a loss target or is rejected with a known reason."""
    try:
        record = parse_record(obj, resolve_task_kind(kind))
    except RecordError as exc:
        assert exc.reason in REASONS and exc.detail
    else:
        assert record.plan.has_loss
        n_in = len(record.input_images)
        for item in record.plan.items:
            if item.image is not None:
                limit = n_in if item.image.role == "input" else len(record.output_images)
                assert item.image.index < limit


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=60) | st.text(max_size=60).map(lambda t: t.encode("utf-8")))
def test_decode_line_never_crashes(raw):
    try:
        obj = decode_line(raw)
    except RecordError as exc:
        assert exc.reason in ("not_utf8", "json_invalid", "not_object")
    else:
        assert isinstance(obj, dict)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 4), turns=st.integers(1, 3), answer=st.text(min_size=1, max_size=30).filter(str.strip),
       kind=st.sampled_from(["sft", "sft_recon_v1", "sft_recon_v2", "vlm_sft"]))
def test_valid_generated_records(n, turns, answer, kind):
    """Well-formed records of the SFT kinds always parse, and the plan shows each image as many times as tagged."""
    tags = "<image>" * n
    if kind == "vlm_sft":
        messages = msgs(f"{tags} question", answer) + msgs("follow-up", answer) * (turns - 1)
        obj = {"image": [f"{i}.png" for i in range(n)], "conversations": messages}
    else:
        messages = msgs(f"{tags} question", answer) * turns
        obj = {"input_img": [img(f"{i}.png") for i in range(n)], "message": messages}
    record = parse_record(json.loads(json.dumps(obj)), resolve_task_kind(kind))
    vit = [i for i in record.plan.items if i.type == "vit_image"]
    assert len(vit) == (n if kind == "vlm_sft" else n * turns)
    assert sum(1 for i in record.plan.items if i.loss) >= 1
