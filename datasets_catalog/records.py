"""Record parsing and validation per task kind: one JSONL line in, a `ParsedRecord` or a `RecordError` out.

Pure Python (no image I/O): ingest calls it on every line, tests call it directly. Every rejection carries a
short stable reason code (`REASONS`) and a sentence a person can act on. Image files are checked later by
`pipelines.imaging.probe`, which raises the image_* codes listed here too.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .columns import RecordMapping
from .plan import IMAGE_TAG, Message, SamplePlan, build_plan
from .task_kinds import TaskKind

# Stable reason codes (they appear in `_rejects.parquet` and in summaries; never rename one).
REASONS: dict[str, str] = {
    "not_utf8": "the line is not valid UTF-8",
    "json_invalid": "the line is not valid JSON",
    "not_object": "the line is JSON but not an object",
    "field_missing": "a field the task kind needs is missing",
    "field_type": "a field has the wrong type",
    "message_role": "a message's 'from' is not 'human' or 'gpt'",
    "image_count": "the number of images does not fit the task kind",
    "image_tag_mismatch": "<image> tags do not match the images given",
    "no_loss_target": "the sample has nothing to learn from (no answer, no target image)",
    "too_long": "the sample is longer than the task kind allows",
    "path_escapes_data_dir": "an image path leaves data_dir",
    "image_missing": "an image file does not exist",
    "image_empty": "an image file or its pixel size is empty",
    "image_corrupt": "an image file cannot be read as an image",
    "image_truncated": "an image file ends early",
    "image_too_large": "an image has more pixels than the cap (decompression-bomb guard)",
    "image_unsupported": "an image file's format has no reader",
    "size_mismatch": "declared width/height differ from the real image",
    "frames_ambiguous": "more than one image of a record expands into frames",
    "json_too_deep": "the line nests JSON arrays/objects deeper than the limit",
    "text_invalid_unicode": "a string holds a lone surrogate (cannot be encoded as UTF-8)",
    "path_invalid": "an image path holds a NUL or control character",
    "image_not_regular_file": "an image path names a FIFO, socket, device or folder, not a file",
    "image_too_big": "an image file is larger than max_image_bytes",
    "internal_error": "an unexpected error while handling this line (exception type and message in detail)",
    "worker_failed": "the worker processing this line's chunk died twice; the line was not processed",
}

MAX_JSON_DEPTH = 64   # real records nest 4-5 levels; Python's json recursion would fail near 1,000
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(rb"[\[\]{}]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

UMV_FIELDS = ("input_img", "output_img", "message")
VLM_FIELDS = ("image", "conversations")
ROLES = ("human", "gpt")


class RecordError(ValueError):
    """A rejected record: `reason` is a code from REASONS, `detail` a sentence a person can act on."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageRef:
    """One image as the record declares it (path as written, optional declared size)."""

    role: str                      # "input" or "output"
    index: int
    path: str
    width: int | None = None
    height: int | None = None


@dataclass
class ParsedRecord:
    messages: list[Message]
    input_images: list[ImageRef]
    output_images: list[ImageRef]
    extra: dict[str, Any] = field(default_factory=dict)   # unrecognised fields, kept verbatim
    plan: SamplePlan = field(default_factory=SamplePlan)

    @property
    def plan_texts(self) -> list[str]:
        return [item.text or "" for item in self.plan.items if item.type == "text"]

    @property
    def images(self) -> list[ImageRef]:
        return [*self.input_images, *self.output_images]


def vit_img_num(kind: TaskKind, n_images: int) -> int:
    """The `img_num` the ViT transform is called with (docs/upstream-compat.md#resize-rule): image count for vlm_sft, else 1."""
    return max(1, n_images) if kind.vit_img_num_is_image_count else 1


def decode_line(raw: bytes) -> dict[str, Any]:
    """bytes -> JSON object, or RecordError(not_utf8 | json_invalid | not_object)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError("not_utf8", f"byte {exc.start} (0x{raw[exc.start]:02x}) is not valid UTF-8; "
                                      f"re-encode the JSONL file as UTF-8") from None
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:   # cheap test first: few lines get past it
        _check_depth(raw)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError("json_invalid", f"{exc.msg} at column {exc.colno}; fix the JSON on this line") from None
    except RecursionError:
        raise RecordError("json_too_deep", f"the JSON nests deeper than this Python can parse; keep records "
                                           f"under {MAX_JSON_DEPTH} levels") from None
    if not isinstance(obj, dict):
        raise RecordError("not_object", f"expected a JSON object {{...}}, got {type(obj).__name__}")
    if _SURROGATE_ESCAPE.search(raw):   # only a \\uD800-\\uDFFF escape can make a string that UTF-8 cannot hold
        _check_unicode(obj, "record")
    return obj


def _check_depth(raw: bytes) -> None:
    """RecordError(json_too_deep) when arrays/objects nest deeper than MAX_JSON_DEPTH (strings skipped)."""
    depth = 0
    for bracket in _BRACKETS.findall(_JSON_STRING.sub(b"", raw)):
        depth += 1 if bracket in b"[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise RecordError("json_too_deep", f"arrays/objects nest more than {MAX_JSON_DEPTH} levels deep; "
                                               f"flatten the record (real records need 4-5 levels)")


def _check_unicode(value: Any, where: str) -> None:
    """RecordError(text_invalid_unicode) for a string (or key) holding a lone surrogate such as "\\ud800"."""
    stack = [(value, where)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise RecordError("text_invalid_unicode", f"{at or 'a string'} holds a lone surrogate "
                                                          f"({item[exc.start]!r} at character {exc.start}); "
                                                          f"write the character itself or a valid pair") from None
        elif isinstance(item, dict):
            stack.extend((k, f"{at}.{k!r} (key)") for k in item)
            stack.extend((v, f"{at}.{k}" if isinstance(k, str) else at) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(item))


def _int_or_none(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RecordError("field_type", f"{where} must be a positive whole number, got {value!r}")
    return value


def _parse_image(entry: Any, role: str, index: int, where: str, leftovers: list) -> ImageRef:
    if isinstance(entry, str):
        leftovers.append({})
        path = entry
        return ImageRef(role, index, _check_path(path, where))
    if not isinstance(entry, dict):
        raise RecordError("field_type", f"{where} must be an object with 'path' (or a path string), "
                                        f"got {type(entry).__name__}")
    if "path" not in entry:
        raise RecordError("field_missing", f"{where} has no 'path'; give the image path relative to data_dir")
    path = _check_path(entry["path"], f"{where}.path")
    width = _int_or_none(entry.get("width"), f"{where}.width")
    height = _int_or_none(entry.get("height"), f"{where}.height")
    leftovers.append({k: v for k, v in entry.items() if k not in ("path", "width", "height")})
    return ImageRef(role, index, path, width, height)


def _check_path(path: Any, where: str) -> str:
    if not isinstance(path, str):
        raise RecordError("field_type", f"{where} must be a string, got {type(path).__name__}")
    if not path.strip():
        raise RecordError("field_missing", f"{where} is empty; give the image path relative to data_dir")
    bad = _CONTROL.search(path)
    if bad:
        raise RecordError("path_invalid", f"{where} holds the control character {bad.group()!r} at position "
                                          f"{bad.start()}; fix the path (file names cannot contain it)")
    return path


def parse_images(obj: dict, key: str, role: str, extra: dict) -> list[ImageRef]:
    value = obj.get(key)
    if value is None:
        return []
    if isinstance(value, (dict, str)):
        value = [value]   # Ver1 accepts a single dict; a bare path string is accepted too
    if not isinstance(value, list):
        raise RecordError("field_type", f"'{key}' must be a list of images, got {type(value).__name__}")
    leftovers: list[dict] = []
    images = [_parse_image(entry, role, i, f"{key}[{i}]", leftovers) for i, entry in enumerate(value)]
    if any(leftovers):
        extra[f"_{key}_fields"] = leftovers
    return images


def parse_messages(obj: dict, key: str, extra: dict) -> list[Message]:
    if key not in obj:
        raise RecordError("field_missing", f"no '{key}' field; give the conversation as a list of "
                                           f"{{\"from\": \"human\"|\"gpt\", \"value\": ...}}")
    value = obj[key]
    if not isinstance(value, list):
        raise RecordError("field_type", f"'{key}' must be a list of messages, got {type(value).__name__}")
    messages: list[Message] = []
    leftovers: list[dict] = []
    for i, message in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(message, dict):
            raise RecordError("field_type", f"{where} must be an object with 'from' and 'value', "
                                            f"got {type(message).__name__}")
        for name in ("from", "value"):
            if name not in message:
                raise RecordError("field_missing", f"{where} has no '{name}'")
        role, text = message["from"], message["value"]
        if not isinstance(role, str):
            raise RecordError("field_type", f"{where}.from must be a string, got {type(role).__name__}")
        if role not in ROLES:
            raise RecordError("message_role", f"{where}.from is {role!r}; use 'human' for prompts and 'gpt' "
                                              f"for answers")
        if not isinstance(text, str):
            raise RecordError("field_type", f"{where}.value must be a string, got {type(text).__name__}")
        messages.append(Message(role, text))
        leftovers.append({k: v for k, v in message.items() if k not in ("from", "value")})
    if any(leftovers):
        extra[f"_{key}_fields"] = leftovers
    return messages


def _count_check(kind: TaskKind, n: int, low: int, high: int | None, what: str, key: str) -> None:
    if n < low or (high is not None and n > high):
        want = f"exactly {low}" if low == high else (f"at least {low}" if high is None else f"{low} to {high}")
        raise RecordError("image_count", f"task {kind.name!r} needs {want} {what} image(s) in '{key}', got {n}")


def _tags(text: str) -> int:
    return text.count(IMAGE_TAG)


def _check_tags(kind: TaskKind, messages: list[Message], n_input: int) -> None:
    """The kind's `image_tags` rule (datasets_catalog.task_kinds) on the messages."""
    rule = kind.image_tags
    if rule == "removed":
        return
    human = [m for m in messages if m.role == "human"]
    if rule in ("per_turn", "in_order", "forbidden"):
        for i, m in enumerate(messages):
            if m.role == "gpt" and _tags(m.value):
                raise RecordError("image_tag_mismatch", f"answer (message {i}) contains {IMAGE_TAG}; answers "
                                                        f"cannot show images in task {kind.name!r}: remove the tag")
    if rule == "forbidden":
        tagged = [i for i, m in enumerate(messages) if _tags(m.value)]
        if tagged:
            raise RecordError("image_tag_mismatch", f"message {tagged[0]} contains {IMAGE_TAG}; text-to-image "
                                                    f"prompts are plain text: remove the tag")
    elif rule == "in_order":
        total = sum(_tags(m.value) for m in human)
        if total != n_input:
            raise RecordError("image_tag_mismatch", f"{total} {IMAGE_TAG} tag(s) across the prompts but "
                                                    f"{n_input} image(s): add one tag per image, in order")
    elif rule == "per_turn":
        # Upstream indexes images by the tag's position within its own turn.
        most = max((_tags(m.value) for m in human), default=0)
        if most != n_input:
            raise RecordError("image_tag_mismatch", f"the prompt with the most {IMAGE_TAG} tags has {most} but "
                                                    f"the record gives {n_input} input image(s); in this task the "
                                                    f"k-th tag of a turn shows image k, so one turn must tag "
                                                    f"every image")
    elif rule == "one_source":
        last = human[-1].value if human else ""
        if _tags(last) > 1:
            raise RecordError("image_tag_mismatch", f"the instruction has {_tags(last)} {IMAGE_TAG} tags; task "
                                                    f"{kind.name!r} shows exactly one source image: keep at most "
                                                    f"one tag")
    else:  # pragma: no cover - ImageTagRule is a closed set
        raise ValueError(f"task kind {kind.name!r} has unknown image_tags rule {rule!r}")


def _native_keys(kind: TaskKind) -> tuple[str, str | None, str | None]:
    """(messages, input images, output images) fields of the kind's native record."""
    if kind.record_style == "vlm_sft":
        return "conversations", "image", None
    return ("message", "input_img", "output_img") if kind.needs_images else ("message", None, None)


def apply_mapping(obj: dict[str, Any], mapping: RecordMapping, kind: TaskKind) -> dict[str, Any]:
    """A mapped record (datasets_catalog.columns) as the kind's native record, so `parse_record` validates it
    like any other. Roles become human/gpt; system messages and unmapped fields are kept for `extra`. Checks
    run in the native order (images, then messages), so a record gets the reason its native twin would."""
    m = mapping
    native_messages, native_inputs, native_outputs = _native_keys(kind)
    native: dict[str, Any] = {}
    used = {m.messages}
    for source, target in ((m.images, native_inputs), (m.output_images, native_outputs)):
        if source is not None and target is not None and source in obj:
            native[target] = obj[source]
            used.add(source)
    if kind.record_style == "vlm_sft" and native_inputs not in native:
        raise RecordError("field_missing", f"no '{m.images}' field (columns.images); give the image path "
                                           f"(or a list)")
    for target, role in ((native_inputs, "input"), (native_outputs, "output")):
        if target in native:
            parse_images(native, target, role, {})   # its errors first, as parse_record raises them
    if m.messages not in obj:
        raise RecordError("field_missing", f"no '{m.messages}' field (columns.messages); give the conversation "
                                           f"as a list of {{\"{m.role_tag}\": \"{m.user_tag}\"|\"{m.assistant_tag}\", "
                                           f"\"{m.content_tag}\": ...}}")
    value = obj[m.messages]
    if not isinstance(value, list):
        raise RecordError("field_type", f"'{m.messages}' must be a list of messages, got {type(value).__name__}")
    messages, system = [], []
    for i, message in enumerate(value):
        where = f"{m.messages}[{i}]"
        if not isinstance(message, dict):
            raise RecordError("field_type", f"{where} must be an object with '{m.role_tag}' and "
                                            f"'{m.content_tag}', got {type(message).__name__}")
        for key in (m.role_tag, m.content_tag):
            if key not in message:
                raise RecordError("field_missing", f"{where} has no '{key}' (the catalog's tags: say messages "
                                                   f"hold '{m.role_tag}' and '{m.content_tag}'; set tags: to "
                                                   f"match the file)")
        role, text = message[m.role_tag], message[m.content_tag]
        if not isinstance(role, str):
            raise RecordError("field_type", f"{where}.{m.role_tag} must be a string, got {type(role).__name__}")
        if role not in (m.user_tag, m.assistant_tag, m.system_tag):
            raise RecordError("message_role", f"{where}.{m.role_tag} is {role!r}; the catalog's tags read "
                                              f"{m.user_tag!r} as prompts, {m.assistant_tag!r} as answers and "
                                              f"{m.system_tag!r} as a system prompt (kept in extra)")
        if not isinstance(text, str):
            raise RecordError("field_type", f"{where}.{m.content_tag} must be a string, got {type(text).__name__} "
                                            f"(put the text in one string and the images in the "
                                            f"'{m.images or m.messages}' field)")
        rest = {k: v for k, v in message.items() if k not in (m.role_tag, m.content_tag)}
        if role == m.system_tag:
            system.append({m.role_tag: role, m.content_tag: text, **rest})
        else:
            messages.append({"from": "human" if role == m.user_tag else "gpt", "value": text, **rest})
    native[native_messages] = messages
    if system:
        native["_system_messages"] = system
    reserved = {native_messages, native_inputs, native_outputs, *native}
    for key, item in obj.items():
        if key not in used:   # kept for extra; a name the native record reads is renamed, never read
            native[f"_source_{key}" if key in reserved else key] = item
    return native


def parse_record(obj: dict[str, Any], kind: TaskKind, mapping: RecordMapping | None = None) -> ParsedRecord:
    """Validate one decoded JSONL object against its task kind and build its sequence plan. With a column
    mapping the record is first turned into the kind's native fields (`apply_mapping`)."""
    if mapping is None:
        return _parse_native(obj, kind)
    try:
        return _parse_native(apply_mapping(obj, mapping, kind), kind)
    except RecordError as exc:
        raise RecordError(exc.reason, _in_mapped_names(exc.detail, mapping, kind)) from None


def _in_mapped_names(detail: str, mapping: RecordMapping, kind: TaskKind) -> str:
    """A native record's error detail with the image fields named as the mapped file names them."""
    _, inputs, outputs = _native_keys(kind)
    for native, column, key in ((inputs, mapping.images, "images"), (outputs, mapping.output_images, "output_images")):
        if native is None or (f"'{native}'" not in detail and f"{native}[" not in detail):
            continue
        if column is None:
            detail += f" (set columns.{key} to the field holding them)"
        else:
            detail = detail.replace(f"'{native}'", f"'{column}'").replace(f"{native}[", f"{column}[")
    return detail


def _parse_native(obj: dict[str, Any], kind: TaskKind) -> ParsedRecord:
    extra: dict[str, Any] = {}
    if kind.record_style == "vlm_sft":
        known = VLM_FIELDS
        if "image" not in obj:
            hint = " (video records are not supported yet)" if "video" in obj else ""
            raise RecordError("field_missing", f"no 'image' field{hint}; give the image path (or a list)")
        inputs = parse_images(obj, "image", "input", extra)
        outputs: list[ImageRef] = []
        messages = parse_messages(obj, "conversations", extra)
    else:
        known = UMV_FIELDS if kind.needs_images else ("message",)
        inputs = parse_images(obj, "input_img", "input", extra) if kind.needs_images else []
        outputs = parse_images(obj, "output_img", "output", extra) if kind.needs_images else []
        messages = parse_messages(obj, "message", extra)
    extra.update({k: v for k, v in obj.items() if k not in known})

    if len(inputs) + len(outputs) < kind.min_images:
        want = "one image" if kind.min_images == 1 else f"{kind.min_images} images"
        raise RecordError("image_count", f"task {kind.name!r} needs at least {want} in 'output_img' "
                                         f"(or 'input_img')")
    if kind.needs_images:
        in_key = "image" if kind.record_style == "vlm_sft" else "input_img"
        _count_check(kind, len(inputs), kind.min_input_images, kind.max_input_images, "input", in_key)
        _count_check(kind, len(outputs), kind.min_output_images, kind.max_output_images, "output", "output_img")
    if len(messages) < kind.min_messages:
        raise RecordError("field_missing", f"task {kind.name!r} needs at least {kind.min_messages} message(s), "
                                           f"got {len(messages)}")
    _check_tags(kind, messages, len(inputs))
    plan = build_plan(kind, messages, len(inputs), len(outputs))
    if not plan.has_loss:
        raise RecordError("no_loss_target", "no message from 'gpt' and no target image: add an answer so the "
                                            "model has something to learn")
    return ParsedRecord(messages, inputs, outputs, extra, plan)


def check_length(kind: TaskKind, num_tokens: int, n_plan_items: int) -> None:
    """Samples over the kind's `max_content_tokens` are skipped upstream; we reject them visibly."""
    limit = kind.max_content_tokens
    if limit is not None and num_tokens - 2 * n_plan_items > limit:
        raise RecordError("too_long", f"{num_tokens - 2 * n_plan_items} tokens, over the {limit} upstream "
                                      f"allows for {kind.name} samples; shorten the text or use smaller images")
