"""Evaluation records from the three inputs of jobs/evaluate.py (docs/evaluation.md#inputs): JSONL records in
the catalog's UniMedVL format with a data_dir, ingested shards, or a catalog's datasets (read from the shards
its ingest wrote). Every record becomes an `EvalItem`, or an item with `error` set (never dropped).

A record with output images is an image record (generation / editing: scored against output image 0);
otherwise a text record answering its last human turn, scored against the gpt turn that follows it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from datasets_catalog.plan import IMAGE_TAG, Message
from datasets_catalog.transforms import ImageTransformArgs
from pipelines.imaging.decode import ImageDecodeError, load_image_rgb

REPORT_WORDS = ("report", "findings", "impression")


class SourceError(ValueError):
    """A user mistake in the inputs (missing folder, unknown dataset): one line, exit 2."""


@dataclass
class ImageSource:
    """Bytes stored in a shard, or a file path."""

    data: bytes | None = None
    path: Path | None = None
    meta: str | None = None

    def load(self):
        try:
            return load_image_rgb(self.data, self.path, self.meta)
        except ImageDecodeError as exc:
            raise ValueError(str(exc)) from None


@dataclass
class EvalItem:
    sample_id: str
    dataset: str
    task: str
    modality: str | None = None
    question: str = ""
    messages: list[Message] = field(default_factory=list)     # up to and including the last human turn
    images: list[ImageSource] = field(default_factory=list)
    reference: str | None = None                               # text records
    target: ImageSource | None = None                          # image records
    extra: dict[str, Any] = field(default_factory=dict)
    report_dataset: bool = False
    vit_transform: ImageTransformArgs | None = None            # the dataset's own transforms (shards)
    vae_transform: ImageTransformArgs | None = None
    error: str | None = None

    @property
    def is_image(self) -> bool:
        return self.target is not None


def is_report_dataset(modality: str | None, description: str | None) -> bool:
    """A dataset is a report dataset when its catalog modality or description names reports."""
    text = f"{modality or ''} {description or ''}".lower()
    return any(w in text for w in REPORT_WORDS)


def _split_conversation(messages: list[Message]) -> tuple[list[Message], str, str | None] | None:
    last = max((i for i, m in enumerate(messages) if m.role == "human"), default=None)
    if last is None:
        return None
    reference = next((m.value for m in messages[last + 1:] if m.role == "gpt"), None)
    question = messages[last].value.replace(IMAGE_TAG, "").strip()
    return list(messages[: last + 1]), question, reference


def _item(sample_id: str, dataset: str, task: str, messages: list[Message], images: list[ImageSource],
          outputs: list[ImageSource], extra: dict, **kw) -> EvalItem:
    item = EvalItem(sample_id, dataset, task, images=images, extra=extra, **kw)
    split = _split_conversation(messages)
    if split is None:
        item.error = "the record has no human message to answer"
        return item
    item.messages, item.question, item.reference = split
    if outputs:
        item.target = outputs[0]
    elif item.reference is None:
        item.error = "the record has no gpt answer after its last human message to score against"
    return item


def from_jsonl(path: Path, data_dir: Path, dataset: str | None = None) -> Iterator[EvalItem]:
    """Records of a JSONL file in the catalog's format; the dataset name defaults to the file's stem."""
    from model.inference.batch import read_records, resolve_image
    from datasets_catalog.records import RecordError, parse_images

    name = dataset or path.stem
    if not path.is_file():
        raise SourceError(f"--input {path}: no such file")
    for n, rec, err in read_records(path, data_dir):
        sid = f"{name}:{n}"
        if rec is None:
            yield EvalItem(sid, name, "?", error=f"{path}:{n}: {err}")
            continue
        extra = {k: v for k, v in rec.obj.items() if k not in ("input_img", "output_img", "message")}
        try:
            outputs = [ImageSource(path=resolve_image(data_dir, i.path))
                       for i in parse_images(rec.obj, "output_img", "output", {})] if "output_img" in rec.obj else []
        except RecordError as exc:
            yield EvalItem(sid, name, "?", error=f"{path}:{n}: {exc.detail}")
            continue
        task = "edit" if outputs and rec.input_images else ("t2i" if outputs else "sft")
        yield _item(sid, name, task, rec.messages, [ImageSource(path=p) for p in rec.input_images], outputs,
                    extra, report_dataset=False)


def _transform(d: dict | None) -> ImageTransformArgs | None:
    if not d:
        return None
    return ImageTransformArgs(d["max_image_size"], d["min_image_size"], d["image_stride"], d["max_pixels"])


def _images(entries, data_dir: Path | None) -> list[ImageSource]:
    out = []
    for e in entries or []:
        path = data_dir / str(e["path"]).lstrip("/\\") if data_dir is not None and e.get("path") else None
        out.append(ImageSource(e.get("bytes"), path, e.get("meta")))
    return out


def from_shards(shards: Path, names: list[str]) -> Iterator[EvalItem]:
    """Rows of ingested shards (`shards/<name>/part-*.parquet` with `_manifest.json`), in row order."""
    import pyarrow.parquet as pq

    for name in names:
        folder = shards / name
        manifest_path = folder / "_manifest.json"
        if not manifest_path.is_file():
            raise SourceError(f"{folder}: no _manifest.json (dataset {name!r} not ingested, or not complete): run "
                              f"python jobs/ingest.py on its catalog first")
        manifest = json.loads(manifest_path.read_text())
        transforms = manifest.get("transforms") or {}
        vit, vae = _transform(transforms.get("vit_image_transform_args")), _transform(transforms.get("image_transform_args"))
        modality, description = manifest.get("modality"), manifest.get("description")
        report = is_report_dataset(modality, description)
        data_dir = Path(manifest["data_dir"]) if manifest.get("data_dir") else None
        for shard in manifest.get("shards", []):
            table = pq.read_table(folder / shard["file"])
            for row in table.to_pylist():
                messages = [Message(m["from"], m["value"]) for m in row["messages"] or []]
                extra = json.loads(row["extra"]) if row.get("extra") else {}
                yield _item(row["sample_id"], name, row["task"], messages, _images(row["input_images"], data_dir),
                            _images(row["output_images"], data_dir), extra if isinstance(extra, dict) else {},
                            modality=modality, report_dataset=report, vit_transform=vit, vae_transform=vae)


def from_catalog(catalog_path: Path, names: list[str]) -> Iterator[EvalItem]:
    """The named datasets of a catalog, read from the shards at its output_dir (ingest them first)."""
    from datasets_catalog.catalog import CatalogError, load_catalog

    try:
        catalog = load_catalog(catalog_path)
        specs = catalog.select(names)
    except CatalogError as exc:
        raise SourceError(str(exc)) from None
    yield from from_shards(Path(catalog.output_dir), [s.name for s in specs])
