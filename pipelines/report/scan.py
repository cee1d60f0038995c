"""Read what the quality report needs from a shards folder, without loading image bytes.

Shards are read with pyarrow column projection: the scalar columns plus the image struct fields other
than `bytes`. Only the few rows picked for thumbnails are read again with their bytes (see
`report_thumbs`). Splits and modalities come from each dataset's `_manifest.json`, reject reasons from
its `_rejects.parquet`. A shard file the manifest lists but that is missing, or that does not read as
Parquet, raises `ShardReadError` naming the file and the ingest command that rebuilds it.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.storage.shard_reader import ShardReadError, open_shard, shard_problem

TRAIN_SPLITS = frozenset({"train", "training"})
EVAL_SPLITS = frozenset({"val", "valid", "validation", "dev", "test", "testing", "eval", "evaluation", "holdout"})
IMAGE_COLUMNS = ("input_images", "output_images")
SCALAR_COLUMNS = ("sample_id", "dataset", "task", "line_number", "text_tokens", "num_tokens")
IMAGE_FIELDS = ("path", "width", "height", "format", "vae_width", "vae_height", "vae_tokens", "vit_tokens",
                "sha256", "meta")


@dataclass(frozen=True)
class ImageRef:
    """One image of one shard row, enough to name it in a duplicate or leakage listing."""

    dataset: str
    split: str | None
    sample_id: str
    line_number: int | None
    role: str            # "input" or "output"
    position: int        # index in the row's image list
    path: str | None
    sha256: str

    def describe(self) -> str:
        line = f"line {self.line_number}" if self.line_number is not None else "line ?"
        return f"{self.sample_id} ({self.dataset}, split {self.split or '?'}, {line}, {self.role} image " \
               f"{self.position}: {self.path})"


@dataclass
class DatasetStats:
    name: str
    folder: Path
    manifest: dict[str, Any]
    rows: int = 0
    task: str | None = None
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    vae_tokens: list[int] = field(default_factory=list)
    vit_tokens: list[int] = field(default_factory=list)
    text_tokens: list[int] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)
    image_modalities: Counter = field(default_factory=Counter)   # from image meta (e.g. DICOM Modality)
    rejects: Counter = field(default_factory=Counter)
    files: list[Path] = field(default_factory=list)

    @property
    def split(self) -> str | None:
        value = self.manifest.get("split")
        return str(value) if value is not None else None

    @property
    def modality(self) -> str | None:
        value = self.manifest.get("modality")
        return str(value) if value is not None else None

    @property
    def images(self) -> int:
        return len(self.widths)


@dataclass
class ShardScan:
    root: Path
    datasets: dict[str, DatasetStats]
    images: list[ImageRef]


def split_kind(split: str | None) -> str | None:
    """'train', 'eval' or None for a manifest split value."""
    if split is None:
        return None
    s = split.strip().lower()
    if s in TRAIN_SPLITS:
        return "train"
    if s in EVAL_SPLITS:
        return "eval"
    return None


def dataset_folders(root: Path) -> list[Path]:
    """Dataset folders under a shards dir: those with a manifest or part files (temp folders skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"shards folder {root} does not exist; run jobs/ingest.py first or check the path")
    out = []
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.name.startswith((".", "_")) or child.name.endswith((".tmp", ".partial")):
            continue
        if (child / "_manifest.json").is_file() or any(child.glob("part-*.parquet")):
            out.append(child)
    return out


def _projected_columns(pf: pq.ParquetFile, fields: Iterable[str]) -> list[str]:
    """Leaf column paths of the wanted scalar columns and image struct fields (never `bytes`)."""
    wanted_leaf = set(fields)
    paths = [pf.schema.column(i).path for i in range(len(pf.schema))]
    out = [p for p in paths if p in SCALAR_COLUMNS]
    for p in paths:
        top, _, rest = p.partition(".")
        if top in IMAGE_COLUMNS and rest.rsplit(".", 1)[-1] in wanted_leaf:
            out.append(p)
    return out


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "_manifest.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_rejects(folder: Path) -> Counter:
    path = folder / "_rejects.parquet"
    if not path.is_file():
        return Counter()
    table = pq.read_table(path, columns=["reason"])
    return Counter(str(r) for r in table.column("reason").to_pylist())


def _meta_modality(meta: str | None) -> str | None:
    if not meta:
        return None
    try:
        value = json.loads(meta)
    except ValueError:
        return None
    if isinstance(value, dict) and value.get("modality"):
        return str(value["modality"])
    return None


def scan_dataset(folder: Path, collect_refs: list[ImageRef] | None = None) -> DatasetStats:
    manifest = _read_manifest(folder)
    stats = DatasetStats(name=str(manifest.get("dataset") or folder.name), folder=folder, manifest=manifest)
    stats.task = manifest.get("task")
    stats.rejects = _read_rejects(folder)
    listed = [folder / str(s.get("file")) for s in manifest.get("shards") or [] if isinstance(s, dict)]
    catalog = manifest.get("catalog")   # the catalog the ingest read: named in the command that rebuilds
    for path in listed:
        if not path.is_file():
            raise ShardReadError(path, "shard file listed in _manifest.json is missing", catalog)
    stats.files = sorted(set(folder.glob("part-*.parquet")) | set(listed))
    for path in stats.files:
        try:
            pf = open_shard(path)
            table = pf.read(columns=_projected_columns(pf, IMAGE_FIELDS))
        except ShardReadError as exc:
            raise ShardReadError(path, exc.problem, catalog) from None
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise ShardReadError(path, shard_problem(exc), catalog) from None
        cols = {name: table.column(name).to_pylist() for name in table.column_names}
        n = table.num_rows
        stats.rows += n
        ids = cols.get("sample_id", [None] * n)
        lines = cols.get("line_number", [None] * n)
        for key, target in (("text_tokens", stats.text_tokens), ("num_tokens", stats.num_tokens)):
            target.extend(int(v) for v in cols.get(key, []) if v is not None)
        if stats.task is None and cols.get("task"):
            stats.task = cols["task"][0]
        for role_col in IMAGE_COLUMNS:
            role = role_col.split("_")[0]
            for r, images in enumerate(cols.get(role_col, [None] * n)):
                for pos, img in enumerate(images or []):
                    if img.get("width") is not None and img.get("height") is not None:
                        stats.widths.append(int(img["width"]))
                        stats.heights.append(int(img["height"]))
                    if img.get("vae_tokens") is not None:
                        stats.vae_tokens.append(int(img["vae_tokens"]))
                    if img.get("vit_tokens") is not None:
                        stats.vit_tokens.append(int(img["vit_tokens"]))
                    stats.formats[str(img.get("format") or "?")] += 1
                    modality = _meta_modality(img.get("meta"))
                    if modality:
                        stats.image_modalities[modality] += 1
                    if collect_refs is not None and img.get("sha256"):
                        collect_refs.append(ImageRef(
                            dataset=stats.name, split=stats.split, sample_id=str(ids[r]),
                            line_number=int(lines[r]) if lines[r] is not None else None,
                            role=role, position=pos, path=img.get("path"), sha256=str(img["sha256"]),
                        ))
    return stats


def scan_shards(root: str | Path, only: Iterable[str] | None = None) -> ShardScan:
    """Scan every dataset folder under `root` (or only the named ones)."""
    root = Path(root)
    wanted = set(only) if only else None
    refs: list[ImageRef] = []
    datasets: dict[str, DatasetStats] = {}
    for folder in dataset_folders(root):
        if wanted is not None and folder.name not in wanted:
            continue
        stats = scan_dataset(folder, refs)
        datasets[stats.name] = stats
    return ShardScan(root=root, datasets=datasets, images=refs)


@dataclass(frozen=True)
class DuplicateGroup:
    """Rows (at least two distinct ones) holding the same image content."""

    sha256: str
    refs: tuple[ImageRef, ...]

    @property
    def datasets(self) -> list[str]:
        return sorted({r.dataset for r in self.refs})

    @property
    def kind(self) -> str:
        """'leakage' (train and eval splits share it), 'cross_dataset' or 'within_dataset'."""
        kinds = {split_kind(r.split) for r in self.refs}
        if "train" in kinds and "eval" in kinds:
            return "leakage"
        return "cross_dataset" if len(self.datasets) > 1 else "within_dataset"


@dataclass(frozen=True)
class LeakagePair:
    """The same image in a training row and in a validation/test row."""

    sha256: str
    train: ImageRef
    eval: ImageRef

    def describe(self) -> str:
        return f"{self.train.describe()}  <->  {self.eval.describe()}  [sha256 {self.sha256[:12]}]"


_KIND_ORDER = {"leakage": 0, "cross_dataset": 1, "within_dataset": 2}


def find_duplicates(images: Iterable[ImageRef]) -> list[DuplicateGroup]:
    """Groups of distinct rows sharing a content hash; leakage first, then across, then within datasets."""
    by_hash: dict[str, dict[tuple[str, str], ImageRef]] = defaultdict(dict)
    for ref in images:
        by_hash[ref.sha256].setdefault((ref.dataset, ref.sample_id), ref)  # one ref per row
    groups = [DuplicateGroup(h, tuple(sorted(rows.values(), key=lambda r: (r.dataset, r.sample_id))))
              for h, rows in by_hash.items() if len(rows) > 1]
    groups.sort(key=lambda g: (_KIND_ORDER[g.kind], -len(g.refs), g.sha256))
    return groups


def leakage_pairs(groups: Iterable[DuplicateGroup]) -> list[LeakagePair]:
    out = []
    for g in groups:
        if g.kind != "leakage":
            continue
        trains = [r for r in g.refs if split_kind(r.split) == "train"]
        evals = [r for r in g.refs if split_kind(r.split) == "eval"]
        out.extend(LeakagePair(g.sha256, t, e) for t in trains for e in evals)
    return out


def _split_datasets(root: str | Path) -> list[str]:
    """Folders whose manifest split is a train or an eval split, or [] when one of the two kinds is absent
    (then no leakage is possible and no shard needs reading: the ingest runs this check every time)."""
    names, kinds = [], set()
    for folder in dataset_folders(Path(root)):
        kind = split_kind(_read_manifest(folder).get("split"))
        if kind is not None:
            names.append(folder.name)
            kinds.add(kind)
    return names if kinds == {"train", "eval"} else []


def _leakage_groups(root: str | Path) -> list[DuplicateGroup]:
    names = _split_datasets(root)
    if not names:
        return []
    return [g for g in find_duplicates(scan_shards(root, names).images) if g.kind == "leakage"]


def find_leakage(root: str | Path) -> list[LeakagePair]:
    """Train/val(test) leakage pairs among all datasets of a shards folder (reads no image bytes)."""
    return leakage_pairs(_leakage_groups(root))


def leakage_warnings(root: str | Path, limit: int = 10) -> list[str]:
    """Human-readable warnings for an ingest summary: a count line, then one line per shared image naming
    the training rows and the validation/test rows (up to `limit` images); empty when there is no leakage
    or no shards folder."""
    try:
        groups = _leakage_groups(root)
    except FileNotFoundError:
        return []
    if not groups:
        return []
    pairs = len(leakage_pairs(groups))
    lines = [f"WARNING: {len(groups)} image(s) appear in both a training and a validation/test dataset "
             f"({pairs} row pair(s), train/val leakage); see `python jobs/report.py {root}`:"]
    for g in groups[:limit]:
        trains = ", ".join(r.sample_id for r in g.refs if split_kind(r.split) == "train")
        evals = ", ".join(f"{r.sample_id} ({r.split})" for r in g.refs if split_kind(r.split) == "eval")
        path = next((r.path for r in g.refs if r.path), "?")
        lines.append(f"  {path} [sha256 {g.sha256[:12]}]: train {trains}  <->  {evals}")
    if len(groups) > limit:
        lines.append(f"  ... and {len(groups) - limit} more image(s)")
    return lines
