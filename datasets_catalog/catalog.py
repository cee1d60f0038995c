"""The dataset catalog: a YAML manifest listing datasets, validated once with errors a person can act on.

Replaces upstream's `DATASET_INFO` Python dict. Relative paths resolve against the manifest's folder.
Every problem is raised as one `CatalogError` naming the file, the line, the dataset, the field and what
to do, so `jobs/*.py` can print it and exit non-zero without a traceback.

Layout (see docs/ingest.md)::

    output_dir: ../shards            # optional; default: <project root>/shards (see `default_output_dir`)
    tokenizer: builtin               # optional: "builtin" or a tokenizer directory (Qwen2 files)
    max_reject_fraction: 0.5         # optional: fail a dataset when more than this share of rows is rejected
    max_image_pixels: 20000000       # optional: decompression-bomb cap, checked from the header
    max_image_bytes: 536870912       # optional: file-size cap, checked with stat before a file is read
    rows_per_shard: 1000             # optional
    store_pixels: false              # optional: also store decoded, resized pixels (fast loader, more disk)
    datasets:
      - name: chest_xray_vqa
        task: sft                    # alias or upstream class name (datasets_catalog.task_kinds)
        jsonl_path: ../examples/radiology/annotations/vqa.jsonl
        data_dir: ../examples/radiology/images
        modality: xray               # optional: split, license, description too
        image_transform_args: {max_image_size: 1024, min_image_size: 512, image_stride: 16}
        vit_image_transform_args: {max_image_size: 980, min_image_size: 378, image_stride: 14,
                                   max_pixels: 2007040}
        options: {...}               # free-form per-dataset options for extensions (-> extra_options)
        columns: {messages: conversations, images: images}   # optional: ShareGPT / OpenAI-style JSONL
        tags: {role_tag: from, content_tag: value, user_tag: human, assistant_tag: gpt}   # (datasets_catalog.columns)
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from .columns import MappingError, parse_record_mapping
from .hf_mapping import HFSourceError, parse_hf_mapping
from .task_kinds import TaskKind, UnknownTaskKind, resolve_task_kind
from .tokenizer import BUILTIN_SPECS
from .transforms import DEFAULT_VAE_ARGS, DEFAULT_VIT_ARGS, ImageTransformArgs

DEFAULT_MAX_REJECT_FRACTION = 0.5
DEFAULT_MAX_IMAGE_PIXELS = 20_000_000   # upstream UniMedVL's Image.MAX_IMAGE_PIXELS (docs/upstream-compat.md#sequence-plans)
DEFAULT_MAX_IMAGE_BYTES = 512 * 1024 * 1024   # bounds a worker's memory: a larger file is rejected unread
DEFAULT_ROWS_PER_SHARD = 1000
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

TOP_LEVEL_KEYS = ("output_dir", "tokenizer", "max_reject_fraction", "max_image_pixels", "max_image_bytes",
                  "rows_per_shard",
                  "store_pixels", "datasets", "description")
DATASET_KEYS = ("name", "task", "jsonl_path", "data_dir", "modality", "split", "license", "description",
                "image_transform_args", "vit_image_transform_args", "max_reject_fraction", "max_image_pixels",
                "max_image_bytes", "rows_per_shard", "store_pixels", "options", "source", "hf", "columns", "tags")
# Per-dataset keys reserved for extensions (docs/medical_imaging.md: DICOM/NIfTI display rules). They are accepted at the
# dataset level and copied into `DatasetSpec.extra_options`; `register_extra_option` adds more.
EXTRA_OPTION_KEYS: set[str] = {
    "window", "frame", "slice_axis", "slices", "keep_16bit", "allow_burned_in_annotation", "dicom", "nifti",
    "percentiles", "axis", "volume", "allow_burned_in", "keep_dicom_tags",
}


# Validators of `extra_options`, run when a dataset has such options. The catalog knows no extension: each
# one registers its validator at start-up (`register_option_validator`, e.g. from the ingest job), so a
# catalog loaded before that is checked without it. A validator raises ValueError or TypeError, whose
# optional `.key` attribute names the offending field; the message becomes a CatalogError.
OPTION_VALIDATORS: list[Callable[[dict[str, Any]], None]] = []


def register_option_validator(validator: Callable[[dict[str, Any]], None]) -> None:
    """Check every dataset's `extra_options` with `validator` from now on (registering it again is a no-op)."""
    if validator not in OPTION_VALIDATORS:
        OPTION_VALIDATORS.append(validator)


def _validate_extra(ctx: "_Ctx", extra: dict[str, Any]) -> None:
    for validator in OPTION_VALIDATORS:
        try:
            validator(extra)
        except (ValueError, TypeError) as exc:
            key = getattr(exc, "key", None) or "options"
            raise ctx.error(key, f"{exc}") from None


def register_extra_option(key: str) -> None:
    """Let an extension accept a new per-dataset key (stored in `DatasetSpec.extra_options`)."""
    EXTRA_OPTION_KEYS.add(key)


class CatalogError(ValueError):
    """A user mistake in a catalog file. `str()` is the one message to print."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    task: TaskKind
    jsonl_path: Path | None
    data_dir: Path | None
    modality: str | None = None
    split: str | None = None
    license: str | None = None
    description: str | None = None
    image_transform_args: ImageTransformArgs = DEFAULT_VAE_ARGS
    vit_image_transform_args: ImageTransformArgs = DEFAULT_VIT_ARGS
    max_reject_fraction: float = DEFAULT_MAX_REJECT_FRACTION
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD
    store_pixels: bool = False   # also store decoded, resized VAE/ViT pixels (pipelines.imaging.pixels)
    extra_options: dict[str, Any] = field(default_factory=dict)
    line: int | None = None   # line of the dataset entry in the catalog file (for messages)


@dataclass(frozen=True)
class Catalog:
    path: Path
    output_dir: Path
    datasets: dict[str, DatasetSpec]
    tokenizer: str | None = None
    description: str | None = None

    def with_store_pixels(self) -> "Catalog":
        """This catalog with `store_pixels` on for every dataset (`jobs/ingest.py --store-pixels`)."""
        return replace(self, datasets={n: replace(s, store_pixels=True) for n, s in self.datasets.items()})

    def select(self, names: list[str] | None) -> list[DatasetSpec]:
        """The named datasets in catalog order (all when `names` is empty); unknown names are an error."""
        if not names:
            return list(self.datasets.values())
        unknown = [n for n in names if n not in self.datasets]
        if unknown:
            raise CatalogError(
                f"{self.path}: no dataset named {', '.join(map(repr, unknown))}"
                f"{_did_you_mean(unknown[0], self.datasets)}. Datasets in this catalog: "
                f"{', '.join(self.datasets)}"
            )
        return [self.datasets[n] for n in self.datasets if n in names]


# -- YAML with line numbers ----------------------------------------------------------------------------

class _LineDict(dict):
    line: int = 0
    key_lines: dict


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineDict:
    loader.flatten_mapping(node)
    result = _LineDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            raise CatalogError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in one mapping; "
                               f"keep one")
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def project_root(start: Path) -> Path:
    """The nearest folder at or above `start` holding `.git` or `pyproject.toml`, else `start`."""
    for candidate in (start, *start.parents):
        if (candidate / ".git").exists() or (candidate / "pyproject.toml").exists():
            return candidate
    return start


def default_output_dir(manifest: Path) -> Path:
    """`<project root>/shards` (see `project_root`; else `<manifest folder>/shards`). (`shards/` is
    git-ignored in this repository.)"""
    return project_root(manifest.resolve().parent) / "shards"


# -- parsing -------------------------------------------------------------------------------------------

class _Ctx:
    """Builds error messages: file, line, dataset, field, what to do."""

    def __init__(self, path: Path, dataset: str | None = None, mapping: _LineDict | None = None):
        self.path, self.dataset, self.mapping = path, dataset, mapping

    def error(self, field_name: str | None, message: str) -> CatalogError:
        line = None
        if self.mapping is not None:
            line = getattr(self.mapping, "key_lines", {}).get(field_name) or getattr(self.mapping, "line", None)
        where = f"{self.path}" + (f", line {line}" if line else "")
        who = f"dataset {self.dataset!r}" if self.dataset else "catalog"
        what = f", field {field_name!r}" if field_name else ""
        return CatalogError(f"{where}: {who}{what}: {message}")


def _opt_str(ctx: _Ctx, data: dict, key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ctx.error(key, f"must be a text value, got {type(value).__name__}")
    return str(value)


def _positive_int(ctx: _Ctx, data: dict, key: str, default: int) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ctx.error(key, f"must be a positive whole number, got {value!r}")
    return value


def _fraction(ctx: _Ctx, data: dict, key: str, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ctx.error(key, f"must be a number between 0 and 1, got {value!r}")
    return float(value)


def _flag(ctx: _Ctx, data: dict, key: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ctx.error(key, f"must be true or false, got {value!r}")
    return value


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def _transform(ctx: _Ctx, data: dict, key: str, default: ImageTransformArgs) -> ImageTransformArgs:
    try:
        return ImageTransformArgs.from_mapping(data.get(key), default)
    except (TypeError, ValueError) as exc:
        raise ctx.error(key, f"{exc}. Use positive integers for max_image_size, min_image_size, "
                             f"image_stride and (optionally) max_pixels") from None


def _parse_dataset(path: Path, base: Path, index: int, entry: Any, top: dict) -> DatasetSpec:
    if not isinstance(entry, dict):
        raise _Ctx(path).error("datasets", f"entry {index + 1} must be a mapping with name, task, jsonl_path, "
                                           f"got {type(entry).__name__}")
    name = entry.get("name")
    ctx = _Ctx(path, str(name) if name is not None else f"#{index + 1}", entry)
    if name is None:
        raise ctx.error("name", "is missing; give every dataset a unique name (it becomes its shard folder)")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ctx.error("name", f"{name!r} is not a valid name: use letters, digits, '_', '-', '.', "
                                f"starting with a letter or digit")
    for key in entry:
        if key not in DATASET_KEYS and key not in EXTRA_OPTION_KEYS:
            raise ctx.error(key, f"unknown field{_did_you_mean(key, DATASET_KEYS)}; allowed fields: "
                                 f"{', '.join(DATASET_KEYS)} (put extension settings under 'options:')")
    if "task" not in entry:
        raise ctx.error("task", "is missing; use one of the task kinds, e.g. sft, text_only, t2i, edit")
    try:
        kind = resolve_task_kind(entry["task"])
    except UnknownTaskKind as exc:
        raise ctx.error("task", str(exc)) from None

    hf = _hf_source(ctx, path, base, entry, kind, name)   # `source: hf`: a local Hugging Face dataset
    if hf is not None:
        jsonl_path, data_dir, hf_options = hf
    else:
        jsonl = _opt_str(ctx, entry, "jsonl_path")
        if jsonl is None:
            raise ctx.error("jsonl_path", "is missing; point it at the dataset's JSONL file "
                                          "(relative paths resolve against the catalog's folder)")
        jsonl_path = _resolve(base, jsonl)
        if not jsonl_path.is_file():
            raise ctx.error("jsonl_path", f"file not found: {jsonl_path}. Check the path (relative paths resolve "
                                          f"against {base})")
        data = _opt_str(ctx, entry, "data_dir")
        data_dir = _resolve(base, data) if data is not None else None
        if data_dir is None and kind.needs_images:
            raise ctx.error("data_dir", f"is missing; task {kind.name!r} reads images, so give the folder that "
                                        f"image paths in the JSONL are relative to")
        if data_dir is not None and not data_dir.is_dir():
            raise ctx.error("data_dir", f"folder not found: {data_dir}. Check the path (relative paths resolve "
                                        f"against {base})")

    options = entry.get("options", {}) or {}
    if not isinstance(options, dict):
        raise ctx.error("options", f"must be a mapping, got {type(options).__name__}")
    extra = {k: v for k, v in entry.items() if k in EXTRA_OPTION_KEYS and k not in DATASET_KEYS}
    extra.update({str(k): v for k, v in options.items()})
    if extra:
        _validate_extra(ctx, extra)
    if hf is not None:
        extra["hf_source"] = hf_options
    mapping = _record_mapping(ctx, entry, kind, hf is not None)
    if mapping is not None:
        extra["record_mapping"] = mapping   # read by the ingest's chunk workers; part of the fingerprint

    return DatasetSpec(
        name=name, task=kind, jsonl_path=jsonl_path.resolve(),
        data_dir=data_dir.resolve() if data_dir is not None else None,
        modality=_opt_str(ctx, entry, "modality"), split=_opt_str(ctx, entry, "split"),
        license=_opt_str(ctx, entry, "license"), description=_opt_str(ctx, entry, "description"),
        image_transform_args=_transform(ctx, entry, "image_transform_args", DEFAULT_VAE_ARGS),
        vit_image_transform_args=_transform(ctx, entry, "vit_image_transform_args", DEFAULT_VIT_ARGS),
        max_reject_fraction=_fraction(ctx, entry, "max_reject_fraction", top["max_reject_fraction"]),
        max_image_pixels=_positive_int(ctx, entry, "max_image_pixels", top["max_image_pixels"]),
        max_image_bytes=_positive_int(ctx, entry, "max_image_bytes", top["max_image_bytes"]),
        rows_per_shard=_positive_int(ctx, entry, "rows_per_shard", top["rows_per_shard"]),
        store_pixels=_flag(ctx, entry, "store_pixels", top["store_pixels"]),
        extra_options=dict(extra), line=getattr(entry, "line", None),
    )


def _record_mapping(ctx: _Ctx, entry: dict, kind: TaskKind, is_hf: bool) -> dict | None:
    """`columns:` / `tags:` (datasets_catalog.columns), checked, as a plain dict; None when neither is given."""
    if "columns" not in entry and "tags" not in entry:
        return None
    if is_hf:
        raise ctx.error("columns" if "columns" in entry else "tags",
                        "a 'source: hf' dataset maps its columns under hf: (question, answer, conversations, "
                        "input_images); columns:/tags: are for JSONL files")
    try:
        return parse_record_mapping(entry.get("columns"), entry.get("tags"), kind).to_dict()
    except MappingError as exc:
        raise ctx.error(exc.field, str(exc)) from None


def _hf_source(ctx: _Ctx, path: Path, base: Path, entry: dict, kind: TaskKind, name: str
               ) -> tuple[Path, Path, dict] | None:
    """For `source: hf` (or an `hf:` mapping): check the mapping (datasets_catalog.hf_mapping) and return the JSONL
    and image folder the ingest materialises it into, plus the mapping for `extra_options["hf_source"]`."""
    source = entry.get("source", "hf" if "hf" in entry else "jsonl")
    if source not in ("jsonl", "hf"):
        raise ctx.error("source", f"must be 'jsonl' (the default: jsonl_path + data_dir) or 'hf' (a local "
                                  f"Hugging Face dataset described under hf:), got {source!r}")
    if source == "jsonl":
        return None
    for key in ("jsonl_path", "data_dir"):
        if key in entry:
            raise ctx.error(key, "a 'source: hf' dataset takes its rows and images from hf.path; remove "
                                 f"{key} (or drop source: hf)")
    try:
        cfg = parse_hf_mapping(entry.get("hf"), base, default_output_dir(path) / "_hf_cache" / name, kind.name,
                               kind.needs_images)
    except HFSourceError as exc:
        raise ctx.error(exc.field or "hf", str(exc)) from None
    return cfg.records_path, cfg.images_dir, cfg.to_dict()


def parse_catalog(text: str, path: str | Path = "<catalog>") -> Catalog:
    """Parse catalog YAML text; relative paths resolve against `path`'s folder."""
    path = Path(path)
    base = path.resolve().parent
    try:
        raw = yaml.load(text, Loader=_LineLoader)
    except CatalogError as exc:
        raise CatalogError(f"{path}, {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise CatalogError(f"{path}{where}: not valid YAML ({problem}); fix the syntax there") from None
    ctx = _Ctx(path, None, raw if isinstance(raw, _LineDict) else None)
    if not isinstance(raw, dict):
        raise ctx.error(None, "must be a mapping with a 'datasets:' list at the top level")
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise ctx.error(key, f"unknown top-level field{_did_you_mean(key, TOP_LEVEL_KEYS)}; allowed: "
                                 f"{', '.join(TOP_LEVEL_KEYS)}")
    entries = raw.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise ctx.error("datasets", "must be a non-empty list of datasets (each with name, task, jsonl_path)")
    top = {
        "max_reject_fraction": _fraction(ctx, raw, "max_reject_fraction", DEFAULT_MAX_REJECT_FRACTION),
        "max_image_pixels": _positive_int(ctx, raw, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
        "max_image_bytes": _positive_int(ctx, raw, "max_image_bytes", DEFAULT_MAX_IMAGE_BYTES),
        "rows_per_shard": _positive_int(ctx, raw, "rows_per_shard", DEFAULT_ROWS_PER_SHARD),
        "store_pixels": _flag(ctx, raw, "store_pixels", False),
    }
    datasets: dict[str, DatasetSpec] = {}
    for index, entry in enumerate(entries):
        spec = _parse_dataset(path, base, index, entry, top)
        if spec.name in datasets:
            raise _Ctx(path, spec.name, entry).error(
                "name", f"duplicate dataset name (also at line {datasets[spec.name].line}); names must be unique "
                        f"because each one becomes a shard folder")
        datasets[spec.name] = spec
    out = _opt_str(ctx, raw, "output_dir")
    output_dir = _resolve(base, out) if out is not None else default_output_dir(path)
    tokenizer = _opt_str(ctx, raw, "tokenizer")
    if tokenizer not in BUILTIN_SPECS:
        folder = _resolve(base, tokenizer)
        if not folder.is_dir():
            raise ctx.error("tokenizer", f"folder not found: {folder}. Use 'builtin' or a folder with Qwen2 "
                                         f"tokenizer files (relative paths resolve against {base})")
        tokenizer = str(folder.resolve())
    return Catalog(path=path, output_dir=output_dir.resolve(), datasets=datasets, tokenizer=tokenizer,
                   description=_opt_str(ctx, raw, "description"))


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate a catalog file. Raises `CatalogError` with one actionable message."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"{path}: catalog file not found; pass the path of a catalog YAML "
                           f"(for example catalog/radiology.yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not UTF-8 text (byte {exc.start}); save the catalog as UTF-8") from None
    return parse_catalog(text, path)
