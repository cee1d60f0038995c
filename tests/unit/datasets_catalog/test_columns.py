"""Catalog column mapping (datasets_catalog.columns) and mapped records (records.apply_mapping): ShareGPT- and
OpenAI-style records parse to exactly what the native record parses to, and are rejected for the same reasons.

Expected values come from the native format (the record written by hand in the kind's own fields), never from
the mapping code."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from datasets_catalog.catalog import CatalogError, parse_catalog
from datasets_catalog.columns import (
    COLUMN_KEYS, SHAREGPT_TAGS, TAG_KEYS, MappingError, RecordMapping, parse_record_mapping,
)
from datasets_catalog.records import RecordError, parse_record
from datasets_catalog.task_kinds import TASK_KINDS, resolve_task_kind

SFT, VLM, TEXT = resolve_task_kind("sft"), resolve_task_kind("vlm_sft"), resolve_task_kind("text_only")
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
SHAREGPT = parse_record_mapping({"messages": "conversations", "images": "images"}, None, SFT)
OPENAI = parse_record_mapping({"messages": "messages", "images": "images"}, OPENAI_TAGS, SFT)


def _parse(obj, kind, mapping=None):
    try:
        return parse_record(obj, kind, mapping)
    except RecordError as exc:
        return exc.reason


def sharegpt(native_messages, images):
    return {"conversations": native_messages, "images": images}


def openai(native_messages, images):
    roles = {"human": "user", "gpt": "assistant"}
    return {"messages": [{"role": roles.get(m["from"], m["from"]), "content": m["value"]} for m in native_messages],
            "images": images}


def test_defaults_are_llama_factory_sharegpt():
    mapping = parse_record_mapping(None, None, SFT)
    assert (mapping.messages, mapping.images, mapping.output_images) == ("conversations", "images", None)
    assert (mapping.role_tag, mapping.content_tag, mapping.user_tag, mapping.assistant_tag, mapping.system_tag) == \
        ("from", "value", "human", "gpt", "system")
    assert parse_record_mapping(None, None, TEXT).images is None


def test_openai_record_equals_the_native_one():
    native = {"input_img": ["ct/a.png"], "message": [{"from": "human", "value": "<image>\nWhich plane?"},
                                                    {"from": "gpt", "value": "Axial."}]}
    mapped = {"messages": [{"role": "user", "content": "<image>\nWhich plane?"},
                           {"role": "assistant", "content": "Axial."}], "images": ["ct/a.png"]}
    assert parse_record(mapped, SFT, OPENAI) == parse_record(native, SFT)


def test_vlm_sft_sharegpt_record_equals_the_native_one():
    mapping = parse_record_mapping({"messages": "conversations", "images": "images"}, None, VLM)
    native = {"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image><image> Same?"},
                                                             {"from": "gpt", "value": "No."}], "id": 7}
    mapped = {"images": ["a.png", "b.png"], "conversations": native["conversations"], "id": 7}
    assert parse_record(mapped, VLM, mapping) == parse_record(native, VLM)
    assert _parse({"conversations": native["conversations"]}, VLM, mapping) == "field_missing"


def test_system_messages_and_colliding_fields_are_kept_in_extra():
    mapped = {"messages": [{"role": "system", "content": "You are a radiologist."},
                           {"role": "user", "content": "<image> Plane?"}, {"role": "assistant", "content": "Axial."}],
              "images": ["a.png"], "input_img": ["other.png"], "source": "pacs"}
    record = parse_record(mapped, SFT, OPENAI)
    assert [m.role for m in record.messages] == ["human", "gpt"]
    assert [i.path for i in record.input_images] == ["a.png"]          # the mapped column, not input_img
    assert record.extra == {"_system_messages": [{"role": "system", "content": "You are a radiologist."}],
                            "_source_input_img": ["other.png"], "source": "pacs"}


@pytest.mark.parametrize("mapped, reason", [
    ({"images": ["a.png"]}, "field_missing"),                                                  # no messages field
    ({"messages": "hi", "images": ["a.png"]}, "field_type"),
    ({"messages": ["hi"], "images": ["a.png"]}, "field_type"),
    ({"messages": [{"role": "user"}], "images": ["a.png"]}, "field_missing"),                  # no content
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}], "images": ["a.png"]}, "field_type"),
    ({"messages": [{"role": "tool", "content": "x"}], "images": ["a.png"]}, "message_role"),
    ({"messages": [{"role": 1, "content": "x"}], "images": ["a.png"]}, "field_type"),
    ({"messages": [{"role": "user", "content": "<image> x"}], "images": ["a.png"]}, "field_missing"),  # one message
    ({"messages": [{"role": "user", "content": "<image> x"}, {"role": "user", "content": "y"}],
      "images": ["a.png"]}, "no_loss_target"),
    ({"messages": [{"role": "user", "content": "<image><image> x"}, {"role": "assistant", "content": "y"}],
      "images": ["a.png"]}, "image_tag_mismatch"),
])
def test_bad_openai_records_are_rejected(mapped, reason):
    assert _parse(mapped, SFT, OPENAI) == reason


def test_mapping_errors_name_the_field():
    with pytest.raises(MappingError, match="unknown key 'image'.*did you mean 'images'"):
        parse_record_mapping({"image": "x"}, None, SFT)
    with pytest.raises(MappingError, match="role_tag and content_tag are both"):
        parse_record_mapping(None, {"role_tag": "x", "content_tag": "x"}, SFT)
    with pytest.raises(MappingError, match="must differ"):
        parse_record_mapping(None, {"user_tag": "gpt"}, SFT)
    with pytest.raises(MappingError, match="reads no images"):
        parse_record_mapping({"images": "images"}, None, TEXT)
    with pytest.raises(MappingError, match="input images only"):
        parse_record_mapping({"output_images": "out"}, None, VLM)
    with pytest.raises(MappingError, match="must be different fields"):
        parse_record_mapping({"messages": "a", "images": "a"}, None, SFT)


def test_catalog_entry_with_a_mapping(tmp_path):
    (tmp_path / "d.jsonl").write_text("{}\n")
    (tmp_path / "img").mkdir()
    head = "datasets:\n  - name: x\n    task: sft\n    jsonl_path: d.jsonl\n    data_dir: img\n"
    cat = parse_catalog(head + "    columns: {messages: messages}\n    tags: {role_tag: role, content_tag: content, "
                               "user_tag: user, assistant_tag: assistant}\n", tmp_path / "c.yaml")
    assert RecordMapping.from_dict(cat.datasets["x"].extra_options["record_mapping"]) == \
        parse_record_mapping({"messages": "messages"}, OPENAI_TAGS, SFT)
    assert "record_mapping" not in parse_catalog(head, tmp_path / "c.yaml").datasets["x"].extra_options
    with pytest.raises(CatalogError, match=r"c.yaml, line 6: dataset 'x', field 'tags': unknown key 'user'"):
        parse_catalog(head + "    tags:\n      user: user\n", tmp_path / "c.yaml")


# -- property tests ----------------------------------------------------------------------------------------

names = st.text(alphabet="abcdefgh_", min_size=0, max_size=4)
anything = st.one_of(st.none(), st.integers(), names, st.lists(names, max_size=2),
                     st.dictionaries(names, names, max_size=2))


@settings(max_examples=300, deadline=None)
@given(columns=st.one_of(anything, st.dictionaries(st.sampled_from(COLUMN_KEYS + ("image",)), anything, max_size=3)),
       tags=st.one_of(anything, st.dictionaries(st.sampled_from(TAG_KEYS + ("user",)), anything, max_size=5)),
       kind=st.sampled_from(TASK_KINDS))
def test_parser_returns_a_mapping_or_one_mapping_error(columns, tags, kind):
    try:
        mapping = parse_record_mapping(columns, tags, kind)
    except MappingError as exc:
        assert exc.field in ("columns", "tags") and str(exc)
        return
    assert RecordMapping.from_dict(mapping.to_dict()) == mapping
    assert mapping.role_tag != mapping.content_tag
    assert len({mapping.user_tag, mapping.assistant_tag, mapping.system_tag}) == 3
    assert (mapping.images is None) == (not kind.needs_images)
    for key, value in (columns or {}).items():
        assert getattr(mapping, key) == value
    for key in TAG_KEYS:
        assert getattr(mapping, key) == (tags or {}).get(key, SHAREGPT_TAGS[key])


texts = st.sampled_from(["<image>\nWhat is shown?", "<image><image> Compare.", "Describe.", "An axial CT.", ""])
native_message = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "bot"]),
                                        "value": st.one_of(texts, st.integers(0, 3))})
paths = st.one_of(st.lists(st.one_of(st.sampled_from(["a.png", "b.png", ""]), st.integers(0, 1),
                                     st.fixed_dictionaries({"path": st.sampled_from(["a.png", 3])})), max_size=3),
                  st.sampled_from(["a.png", 5, None]))


@settings(max_examples=400, deadline=None)
@given(messages=st.lists(native_message, max_size=4), images=paths, vlm=st.booleans())
def test_mapped_records_parse_or_fail_exactly_as_the_native_record(messages, images, vlm):
    """The independent source: the native UMV (or BAGEL vlm_sft) record with the same content."""
    kind = VLM if vlm else SFT
    native = {"image": images, "conversations": messages} if vlm else {"input_img": images, "message": messages}
    expected = _parse(native, kind)
    share = parse_record_mapping({"messages": "conversations", "images": "images"}, None, kind)
    oai = parse_record_mapping({"messages": "messages", "images": "images"}, OPENAI_TAGS, kind)
    assert _parse(sharegpt(messages, images), kind, share) == expected
    assert _parse(openai(messages, images), kind, oai) == expected


@settings(max_examples=300, deadline=None)
@given(record=st.dictionaries(st.sampled_from(["messages", "images", "conversations", "role", "x"]), anything,
                              max_size=4), kind=st.sampled_from(TASK_KINDS))
def test_any_record_is_parsed_or_rejected_never_crashes(record, kind):
    mapping = parse_record_mapping({"messages": "messages"}, OPENAI_TAGS, kind)
    result = _parse(record, kind, mapping)
    assert isinstance(result, str) or result.messages is not None


def test_reject_details_name_the_mapped_fields():
    with pytest.raises(RecordError) as info:
        parse_record({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                      "images": [{"path": 3}]}, SFT, OPENAI)
    assert info.value.reason == "field_type" and info.value.detail.startswith("images[0].path must be a string")
    t2i = resolve_task_kind("t2i")
    with pytest.raises(RecordError) as info:
        parse_record({"conversations": [{"from": "human", "value": "A CT."}], "images": []}, t2i,
                     parse_record_mapping(None, None, t2i))
    assert info.value.reason == "image_count" and "set columns.output_images" in info.value.detail
