"""The column mapping of a catalog entry: ShareGPT- and OpenAI-style JSONL ingest without a conversion script.

In the spirit of LLaMA-Factory's `dataset_info.json` (`columns:` names the record's fields, `tags:` the keys
and values inside each message), e.g. for OpenAI-style records::

    columns: {messages: messages, images: images}
    tags: {role_tag: role, content_tag: content, user_tag: user, assistant_tag: assistant}

This module only checks the mapping (part of loading a catalog); `datasets_catalog.records.apply_mapping`
turns each mapped record into the task kind's native fields, so the same validation and rejects apply.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Any

from .task_kinds import TaskKind

COLUMN_KEYS = ("messages", "images", "output_images")
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag")
# LLaMA-Factory's defaults for its `sharegpt` formatting: a mapping without `tags:` reads ShareGPT messages.
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "system_tag": "system"}
DEFAULT_COLUMNS = {"messages": "conversations", "images": "images"}


class MappingError(ValueError):
    """A mistake in `columns:` / `tags:`; `field` is the catalog key at fault."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


@dataclass(frozen=True)
class RecordMapping:
    """A checked mapping: which record fields hold the conversation and the images, and how messages spell
    roles. `images` / `output_images` are None when the task kind reads no such images."""

    messages: str = "conversations"
    images: str | None = "images"
    output_images: str | None = None
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    system_tag: str = "system"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RecordMapping":
        return cls(**{k: v for k, v in data.items() if k in COLUMN_KEYS + TAG_KEYS})


def _names(value: Any, key: str, allowed: tuple[str, ...]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MappingError(key, f"must be a mapping such as {{{allowed[0]}: ...}}, got {type(value).__name__}")
    out = {}
    for name, column in value.items():
        if name not in allowed:
            close = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise MappingError(key, f"unknown key {name!r}{hint}; allowed under {key}: {', '.join(allowed)}")
        if not isinstance(column, str) or not column.strip():
            raise MappingError(key, f"{key}.{name} must be a non-empty name, got {column!r}")
        out[str(name)] = column
    return out


def parse_record_mapping(columns: Any, tags: Any, kind: TaskKind) -> RecordMapping:
    """Check a catalog entry's `columns:` / `tags:` against its task kind (LLaMA-Factory's ShareGPT defaults
    fill what is not given)."""
    cols = _names(columns, "columns", COLUMN_KEYS)
    tag = {**SHAREGPT_TAGS, **_names(tags, "tags", TAG_KEYS)}
    if not kind.needs_images:
        for key in ("images", "output_images"):
            if key in cols:
                raise MappingError("columns", f"task {kind.name!r} reads no images: remove columns.{key}")
    elif kind.record_style == "vlm_sft" and "output_images" in cols:
        raise MappingError("columns", f"task {kind.name!r} has input images only: remove columns.output_images")
    messages = cols.get("messages", DEFAULT_COLUMNS["messages"])
    images = cols.get("images", DEFAULT_COLUMNS["images"]) if kind.needs_images else None
    output_images = cols.get("output_images")
    named = [c for c in (messages, images, output_images) if c is not None]
    if len(set(named)) != len(named):
        raise MappingError("columns", f"messages, images and output_images must be different fields, got "
                                      f"{', '.join(named)}")
    if tag["role_tag"] == tag["content_tag"]:
        raise MappingError("tags", f"role_tag and content_tag are both {tag['role_tag']!r}; a message needs "
                                   f"one key for the role and another for the text")
    roles = [tag["user_tag"], tag["assistant_tag"], tag["system_tag"]]
    if len(set(roles)) != 3:
        raise MappingError("tags", f"user_tag, assistant_tag and system_tag must differ, got "
                                   f"{', '.join(map(repr, roles))}")
    return RecordMapping(messages, images, output_images, **tag)
