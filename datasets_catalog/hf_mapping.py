"""The `hf:` mapping of a catalog entry (`source: hf`): which local Hugging Face files, which columns, where
the records are materialised.

It lives with the catalog because checking it is part of loading a catalog, which must not reach into the
ingest; `pipelines.ingest.hf_source` reads the files and materialises the records from a checked mapping.
"""
from __future__ import annotations

import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HF_KEYS = ("path", "split", "question", "answer", "conversations", "input_images", "output_images", "template",
           "cache_dir")
RECORDS_FILE = "records.jsonl"
IMAGES_DIR = "images"


class HFSourceError(ValueError):
    """A mistake in an `hf:` catalog mapping or an unreadable source; `field` names the key at fault."""

    def __init__(self, field_name: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field_name


@dataclass(frozen=True)
class HFSourceConfig:
    """A validated `hf:` mapping (paths absolute)."""

    path: str
    split: str | None = None
    question: str | None = None
    answer: str | None = None
    conversations: str | None = None
    input_images: tuple[str, ...] = ()
    output_images: tuple[str, ...] = ()
    template: str | None = None
    cache_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HFSourceConfig":
        data = dict(data)
        for key in ("input_images", "output_images"):
            data[key] = tuple(data.get(key) or ())
        return cls(**{k: v for k, v in data.items() if k in HF_KEYS})

    @property
    def records_path(self) -> Path:
        return Path(self.cache_dir) / RECORDS_FILE

    @property
    def images_dir(self) -> Path:
        return Path(self.cache_dir) / IMAGES_DIR


def _columns(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise HFSourceError(key, f"must be a column name or a list of column names, got {value!r}")


def parse_hf_mapping(mapping: Any, base: Path, default_cache: Path, task_name: str,
                     needs_images: bool) -> HFSourceConfig:
    """Check an `hf:` mapping from a catalog entry (no file is read except an existence check)."""
    if not isinstance(mapping, dict):
        raise HFSourceError("hf", f"must be a mapping with at least 'path' (and question/answer/input_images "
                                  f"columns), got {type(mapping).__name__}")
    unknown = [k for k in mapping if k not in HF_KEYS]
    if unknown:
        raise HFSourceError("hf", f"unknown key {unknown[0]!r} under hf:; allowed: {', '.join(HF_KEYS)}")
    raw_path = mapping.get("path")
    if not isinstance(raw_path, str) or not raw_path.strip():
        raise HFSourceError("hf", "hf.path is missing; give the save_to_disk folder or the Parquet/Arrow "
                                  "file(s) of the dataset (relative paths resolve against the catalog's folder)")
    path = Path(raw_path).expanduser()
    path = (path if path.is_absolute() else base / path).resolve()
    if not path.exists():
        raise HFSourceError("hf", f"hf.path not found: {path}. Check the path (relative paths resolve against "
                                  f"{base})")
    for key in ("split", "question", "answer", "conversations", "template", "cache_dir"):
        if mapping.get(key) is not None and not isinstance(mapping[key], str):
            raise HFSourceError("hf", f"hf.{key} must be text, got {mapping[key]!r}")
    inputs = _columns(mapping.get("input_images"), "hf")
    outputs = _columns(mapping.get("output_images"), "hf")
    if mapping.get("conversations") and (mapping.get("question") or mapping.get("answer")):
        raise HFSourceError("hf", "give either hf.conversations (a column of turns) or hf.question/hf.answer, "
                                  "not both")
    if not mapping.get("conversations") and not mapping.get("question"):
        raise HFSourceError("hf", "hf.question is missing; name the column holding the prompt (or give "
                                  "hf.conversations)")
    if needs_images and not inputs and not outputs:
        raise HFSourceError("hf", f"task {task_name!r} reads images: list the image column(s) under "
                                  f"hf.input_images / hf.output_images")
    cache = mapping.get("cache_dir")
    cache_dir = ((Path(cache).expanduser() if Path(cache).expanduser().is_absolute() else base / cache)
                 if cache else default_cache).resolve()
    template = mapping.get("template")
    if template is not None:
        template_fields(template)   # syntax check now, column check when the schema is known
    return HFSourceConfig(str(path), mapping.get("split"), mapping.get("question"), mapping.get("answer"),
                          mapping.get("conversations"), inputs, outputs, template, str(cache_dir))


def template_fields(template: str) -> list[str]:
    """The placeholder names of an `hf.template`; HFSourceError when its braces do not parse."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as exc:
        raise HFSourceError("hf", f"hf.template {template!r} is not a valid template ({exc}); use {{column}} "
                                  f"placeholders and double braces for literal ones") from None
