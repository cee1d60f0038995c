"""Hugging Face datasets as an ingest source: a local `save_to_disk` folder or Parquet/Arrow files with an
`Image` feature (how public medical VQA sets such as VQA-RAD, SLAKE or PathVQA are distributed), mapped
onto our record fields by a catalog entry.

    - name: vqa_rad
      task: sft
      source: hf
      hf:
        path: ../hf/vqa_rad           # save_to_disk folder (Dataset or DatasetDict), a .parquet/.arrow file,
                                      # or a folder of them (searched recursively)
        split: train                  # DatasetDict split / data-file name filter (default: train, or the only one)
        question: question            # column for the human turn
        answer: answer                # column for the gpt turn (optional for t2i / edit)
        conversations: null           # or: a column already holding [{from, value}] (or {role, content}) turns
        input_images: [image]         # Image (or list-of-Image) columns -> input_img / image
        output_images: []             # -> output_img
        template: "{image_tags}{question}"   # the human turn: {question} / {answer} are the mapped columns'
                                      # values, {any_column} a column's, {image_tags} "<image>\\n" per input
                                      # image (the default for t2i is "{question}": its prompts take no tags)
        cache_dir: null               # where the records are materialised (default: <project>/shards/_hf_cache/<name>)

How: the rows are read with pyarrow straight from the files (nothing is fetched from a hub:
HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set, and `datasets` is not even needed to read), each row becomes
the same JSON object a JSONL source would hold, and its embedded image bytes are written next to it
(`materialize`). The ingest then reads that JSONL + image folder with the very same code as any JSONL
source, so validation, probing, resize metadata and rejects are identical by construction. Materialising is
skipped when the source files and the mapping are unchanged, so a second ingest is a no-op.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from datasets_catalog.hf_mapping import IMAGES_DIR, RECORDS_FILE, HFSourceConfig, HFSourceError, template_fields
from datasets_catalog.task_kinds import resolve_task_kind
from pipelines.ingest.state import folder_digest
from pipelines.storage import uris as storage

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HF_SOURCE_VERSION = 1            # bump when the materialised output changes for the same input
SOURCE_FILE = "_source.json"
IMAGE_TAG = "<image>"
_LIST_TYPES = ("List", "Sequence", "LargeList")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
          (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"), (b"DICM", ".dcm"))


def default_template(task_name: str) -> str:
    """Questions carry their image tags unless the task kind forbids tags (text-to-image captions)."""
    return "{question}" if resolve_task_kind(task_name).image_tags == "forbidden" else "{image_tags}{question}"


# -- reading the files ------------------------------------------------------------------------------------

@dataclass
class HFTable:
    """The files of one split and their features (from the HF metadata stored with them)."""

    files: list[Path]
    kind: str                                   # "parquet" or "arrow"
    features: dict[str, Any] = field(default_factory=dict)
    schema: pa.Schema | None = None

    def batches(self, batch_rows: int = 256) -> Iterator[pa.RecordBatch]:
        for path in self.files:
            if self.kind == "parquet":
                yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
            else:
                yield from _arrow_batches(path)


def _arrow_batches(path: Path) -> Iterator[pa.RecordBatch]:
    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_stream(source)   # what save_to_disk and the HF cache write
    except pa.ArrowInvalid:
        source = pa.memory_map(str(path))
        file_reader = pa.ipc.open_file(source)
        for i in range(file_reader.num_record_batches):
            yield file_reader.get_batch(i)
        return
    yield from reader


def _features_from_schema(schema: pa.Schema) -> dict[str, Any]:
    meta = schema.metadata or {}
    blob = meta.get(b"huggingface")
    if not blob:
        return {}
    try:
        return json.loads(blob).get("info", {}).get("features", {}) or {}
    except ValueError:
        return {}


def _pick_split(available: list[str], split: str | None, where: Path) -> str:
    if split is not None:
        if split not in available:
            raise HFSourceError("hf", f"{where} has splits {', '.join(available)}, not {split!r}; set hf.split "
                                      f"to one of them")
        return split
    if "train" in available:
        return "train"
    if len(available) == 1:
        return available[0]
    raise HFSourceError("hf", f"{where} has several splits ({', '.join(available)}); choose one with hf.split")


def _split_filter(files: list[Path], root: Path, split: str | None) -> list[Path]:
    if split is None:
        return files
    def matches(p: Path) -> bool:
        rel = p.relative_to(root).as_posix() if p != root else p.name
        tokens = rel.replace("-", "/").replace("_", "/").replace(".", "/").split("/")
        return split in tokens
    chosen = [p for p in files if matches(p)]
    if not chosen:
        raise HFSourceError("hf", f"no data file under {root} belongs to split {split!r} (looked for "
                                  f"'{split}' in the file names); fix hf.split")
    return chosen


def open_hf_table(cfg: HFSourceConfig) -> HFTable:
    """Find the data files of the configured split: save_to_disk folders, or Parquet / Arrow files."""
    root = Path(cfg.path)
    if root.is_dir() and (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        split = _pick_split(list(splits), cfg.split, root)
        root = root / split
        cfg = HFSourceConfig(**{**cfg.to_dict(), "path": str(root), "split": None})
    if root.is_dir() and (root / "state.json").is_file():
        state = json.loads((root / "state.json").read_text())
        files = [root / f["filename"] for f in state.get("_data_files", [])]
        features = {}
        if (root / "dataset_info.json").is_file():
            features = json.loads((root / "dataset_info.json").read_text()).get("features", {}) or {}
        if state.get("_indices_data_files"):
            raise HFSourceError("hf", f"{root} was saved with an indices mapping (a filtered/shuffled view); "
                                      f"call .flatten_indices() before save_to_disk")
        table = HFTable(files, "arrow", features)
    else:
        if root.is_file():
            files = [root]
        else:
            files = sorted(p for p in root.rglob("*") if p.suffix in (".parquet", ".arrow") and p.is_file()
                           and not any(part.startswith((".", "_")) for part in p.relative_to(root).parts))
            files = _split_filter(files, root, cfg.split)
        if not files:
            raise HFSourceError("hf", f"{root} holds no .parquet or .arrow files and is not a save_to_disk "
                                      f"folder; point hf.path at the dataset's files")
        kinds = {p.suffix for p in files}
        if len(kinds) > 1:
            raise HFSourceError("hf", f"{root} mixes Parquet and Arrow files; point hf.path at one kind")
        table = HFTable(files, "parquet" if ".parquet" in kinds else "arrow")
    try:
        schema = (pq.read_schema(table.files[0]) if table.kind == "parquet"
                  else next(iter(_arrow_batches(table.files[0]))).schema)
    except StopIteration:
        schema = pa.schema([])
    except (OSError, pa.ArrowInvalid) as exc:
        raise HFSourceError("hf", f"{table.files[0]} cannot be read ({exc}); is it a Parquet/Arrow file?") \
            from None
    table.schema = schema
    if not table.features:
        table.features = _features_from_schema(schema)
    return table


def is_image_feature(feature: Any) -> bool:
    """Image, or a list/Sequence of Image, in the HF features JSON."""
    if isinstance(feature, list):
        return len(feature) == 1 and is_image_feature(feature[0])
    if not isinstance(feature, dict):
        return False
    if feature.get("_type") == "Image":
        return True
    return feature.get("_type") in _LIST_TYPES and is_image_feature(feature.get("feature"))


def image_columns(table: HFTable) -> list[str]:
    return [name for name, feature in table.features.items() if is_image_feature(feature)]


def _check_columns(cfg: HFSourceConfig, table: HFTable, template: str) -> None:
    names = list(table.schema.names) if table.schema is not None else []
    wanted = [("question", cfg.question), ("answer", cfg.answer), ("conversations", cfg.conversations)]
    wanted += [("input_images", c) for c in cfg.input_images] + [("output_images", c) for c in cfg.output_images]
    for key, column in wanted:
        if column and column not in names:
            raise HFSourceError("hf", f"hf.{key} names column {column!r}, which {cfg.path} does not have; its "
                                      f"columns are: {', '.join(names)}")
    for name in template_fields(template):
        if name not in ("image_tags", "question", "answer") and name not in names:
            raise HFSourceError("hf", f"hf.template uses {{{name}}}, which is not a column of {cfg.path} (columns: "
                                      f"{', '.join(names)}; {{question}} / {{answer}} are the mapped columns' "
                                      f"values and {{image_tags}} the image tags)")


# -- rows -> records -------------------------------------------------------------------------------------

def _ext(data: bytes) -> str:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[128:132] == b"DICM":
        return ".dcm"
    return ".bin"


def _json_safe(value: Any) -> Any:
    if isinstance(value, bytes):
        return None    # binary cells are not carried into the record's extra fields
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)   # dates, decimals, ...


class _ImageWriter:
    """Names and writes the embedded images: the HF `path` file name when there is one (so shards keep the
    original names), else the content hash; identical bytes are written once."""

    def __init__(self, images_dir: Path, source_root: Path) -> None:
        self.images_dir = images_dir
        self.source_root = source_root if source_root.is_dir() else source_root.parent
        self.by_name: dict[str, str] = {}    # relative name -> sha256

    def add(self, cell: Any) -> str | None:
        """One image cell -> the path to write in the record (relative to the images folder)."""
        if cell is None:
            return None
        if isinstance(cell, str):
            cell = {"bytes": None, "path": cell}
        elif isinstance(cell, (bytes, bytearray)):   # a plain binary column, as BAGEL's Parquet datasets have
            cell = {"bytes": bytes(cell), "path": None}
        if not isinstance(cell, dict):
            raise HFSourceError("hf", f"an image cell holds {type(cell).__name__}; image columns must be HF Image "
                                      f"features (bytes/path), encoded image bytes or path strings")
        data, name = cell.get("bytes"), cell.get("path")
        if data is None and name:
            src = Path(name) if os.path.isabs(name) else self.source_root / name
            if src.is_file():
                data = src.read_bytes()
            else:   # keep the reference: the ingest rejects the row as image_missing, like a JSONL row
                return "missing/" + posixpath.basename(name.replace("\\", "/"))
        if data is None:
            return None
        sha = hashlib.sha256(data).hexdigest()
        base = posixpath.basename(str(name).replace("\\", "/")) if name else ""
        if not base or base in (".", ".."):
            base = sha[:16] + _ext(data)
        rel = base
        if self.by_name.get(rel, sha) != sha:
            rel = f"{sha[:12]}/{base}"
        if rel not in self.by_name:
            target = self.images_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            self.by_name[rel] = sha
        return rel


def _cells(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list):
        return value
    return [value]


def _turns(value: Any) -> list[dict[str, Any]]:
    """A conversations cell -> [{from, value}] (also accepts {role, content} chat turns)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return [{"from": "human", "value": value}]
    turns = []
    for turn in value or []:
        if isinstance(turn, dict) and "role" in turn and "from" not in turn:
            role = {"user": "human", "assistant": "gpt"}.get(turn["role"], turn["role"])
            turns.append({"from": role, "value": turn.get("content")})
        else:
            turns.append(turn)
    return turns


def row_to_record(row: dict[str, Any], cfg: HFSourceConfig, record_style: str, task_name: str,
                  images: _ImageWriter, template: str, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """One HF row -> the JSON object a JSONL source would hold for it (image cells -> written files)."""
    inputs = [p for c in cfg.input_images for p in map(images.add, _cells(row.get(c))) if p is not None]
    outputs = [p for c in cfg.output_images for p in map(images.add, _cells(row.get(c))) if p is not None]
    if cfg.conversations:
        messages = _turns(row.get(cfg.conversations))
    else:
        values = {k: ("" if v is None else v) for k, v in row.items()}
        values["image_tags"] = f"{IMAGE_TAG}\n" * len(inputs)
        values["question"] = values.get(cfg.question, "")          # whatever the mapped columns are called
        if cfg.answer:
            values["answer"] = values.get(cfg.answer, "")
        messages = [{"from": "human", "value": template.format_map(values)}]
        answer = row.get(cfg.answer) if cfg.answer else None
        if answer is not None:
            messages.append({"from": "gpt", "value": str(answer)})
    used = {cfg.question, cfg.answer, cfg.conversations, *cfg.input_images, *cfg.output_images, *skip}
    extra = {k: _json_safe(v) for k, v in row.items() if k not in used}
    if record_style == "vlm_sft":
        record: dict[str, Any] = {"image": inputs, "conversations": messages}
    elif not resolve_task_kind(task_name).needs_images:
        record = {"message": messages}
    else:
        record = {"input_img": [{"path": p} for p in inputs], "output_img": [{"path": p} for p in outputs],
                  "message": messages}
    reserved = set(record)
    record.update({k: v for k, v in extra.items() if k not in reserved})
    return record


def iter_records(cfg: HFSourceConfig, record_style: str, task_name: str, images_dir: Path,
                 batch_rows: int = 256) -> Iterator[dict[str, Any]]:
    """Yield one record per row, in row order, writing its images under `images_dir`."""
    table = open_hf_table(cfg)
    template = cfg.template if cfg.template is not None else default_template(task_name)
    _check_columns(cfg, table, template)
    writer = _ImageWriter(images_dir, Path(cfg.path))
    skip = frozenset(image_columns(table))   # unmapped image columns cannot travel as JSON extras
    for batch in table.batches(batch_rows):
        for row in batch.to_pylist():
            yield row_to_record(row, cfg, record_style, task_name, writer, template, skip)


# -- materialising ----------------------------------------------------------------------------------------

def source_digest(cfg: HFSourceConfig, record_style: str, task_name: str) -> str:
    """Changes when the source files (size, mtime) or the mapping change: decides whether to rebuild."""
    root = Path(cfg.path)
    files = folder_digest(root) if root.is_dir() else f"{root.stat().st_size}:{root.stat().st_mtime_ns}"
    blob = json.dumps({"files": files, "cfg": cfg.to_dict(), "style": record_style, "task": task_name,
                       "version": HF_SOURCE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Materialized:
    jsonl_path: Path
    data_dir: Path
    rows: int
    images: int
    rebuilt: bool


def materialize(cfg: HFSourceConfig, record_style: str, task_name: str) -> Materialized:
    """Write `cache_dir/records.jsonl` + `cache_dir/images/` for the ingest (skipped when up to date).
    Built in a sibling temp folder and renamed into place: an interrupted run leaves the old cache."""
    cache = Path(cfg.cache_dir)
    digest = source_digest(cfg, record_style, task_name)
    try:
        previous = json.loads((cache / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        previous = None
    if previous and previous.get("digest") == digest and (cache / RECORDS_FILE).is_file():
        return Materialized(cache / RECORDS_FILE, cache / IMAGES_DIR, previous["rows"], previous["images"], False)
    tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / IMAGES_DIR).mkdir(parents=True)
    rows = 0
    with open(tmp / RECORDS_FILE, "w", encoding="utf-8") as f:
        for record in iter_records(cfg, record_style, task_name, tmp / IMAGES_DIR):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            rows += 1
    images = sum(1 for p in (tmp / IMAGES_DIR).rglob("*") if p.is_file())
    marker = json.dumps({"digest": digest, "rows": rows, "images": images, "source": cfg.path,
                         "split": cfg.split}, indent=2) + "\n"
    storage.publish_tree(tmp, cache, SOURCE_FILE, marker.encode("utf-8"))
    return Materialized(cache / RECORDS_FILE, cache / IMAGES_DIR, rows, images, True)


def prepare_spec(spec):
    """For a catalog entry with `source: hf`: materialise its records (when changed) and return the spec
    (whose jsonl_path / data_dir already point into the cache). Other specs are returned unchanged."""
    raw = (spec.extra_options or {}).get("hf_source")
    if not raw:
        return spec
    cfg = HFSourceConfig.from_dict(raw)
    materialize(cfg, spec.task.record_style, spec.task.name)
    return spec
