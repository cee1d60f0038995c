"""The mixture config: upstream UniMedVL/BAGEL dataset YAML (docs/upstream-compat.md#dataset-yaml), accepted unchanged.

Top-level keys are task kinds (upstream class names or our aliases); each holds one group (list form) or
several (grouped form: `dataset_names: {group: [names]}` -> groups named `{key}_{group}`). The optional
top-level keys are ours:

    catalog: catalog/radiology.yaml   # the dataset catalog; default <project root>/catalog/radiology.yaml
    shards: shards                    # shard folder or s3://bucket/prefix; default: the catalog's output_dir
    seed: 42                          # data seed; default: the `seed` argument of MixtureStream
    weight_unit: samples              # or `tokens`: weights are shares of packed tokens
    stages: [...]                     # curriculum: weights by optimizer step (pipelines/mixture/stages.py)
    train: {...}                      # the trainer's section; ignored here

Relative paths resolve against the config file's folder. This module only parses and checks structure;
`pipelines.mixture.sources.resolve_sources` checks the names against the catalog and the shards.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from datasets_catalog.catalog import CatalogError, _LineLoader, project_root
from datasets_catalog.task_kinds import TaskKind, UnknownTaskKind, resolve_task_kind
from datasets_catalog.transforms import ImageTransformArgs
from pipelines.mixture.stages import Stage, normalised, parse_stages, stage_index

OUR_TOP_LEVEL_KEYS = ("catalog", "shards", "seed", "weight_unit", "train", "shuffle_window_blocks", "stages", "eval")
GROUP_KEYS = ("dataset_names", "image_transform_args", "vit_image_transform_args", "is_mandatory", "weight",
              "num_used_data", "shuffle_lines", "shuffle_seed", "resume_data_status", "frame_sampler_args")
DEFAULT_CATALOG = "catalog/radiology.yaml"
DEFAULT_SHUFFLE_WINDOW_BLOCKS = 4


def _shards_location(base: Path, shards: str):
    """A local shard folder (relative to the config), or an object-storage prefix (`s3://bucket/prefix`,
    read through pyarrow.fs; see docs/cluster.md)."""
    from pipelines.storage import uris as storage

    return storage.as_path(shards) if storage.is_remote(shards) else _resolve(base, shards)


class MixtureConfigError(ValueError):
    """A user mistake in a mixture config (or in what it names). `str()` is the one message to print."""


@dataclass(frozen=True)
class DatasetUse:
    """A dataset of a group; `limit` = use only its first `limit` rows (upstream num_used_data per name)."""

    name: str
    limit: int | None = None


@dataclass(frozen=True)
class GroupConfig:
    name: str                        # stream/metrics name: the key (list form) or `{key}_{group}`
    key: str                         # the top-level key as written (upstream class name or alias)
    task: TaskKind
    datasets: tuple[DatasetUse, ...]
    weight: float = 1.0
    is_mandatory: bool = False
    row_range: tuple[int, int | None] = (0, None)   # grouped form [start, end) over the group's rows
    shuffle_lines: bool = True
    shuffle_seed: int = 0
    image_transform_args: ImageTransformArgs | None = None      # None: as the shards were built
    vit_image_transform_args: ImageTransformArgs | None = None
    line: int | None = None


@dataclass(frozen=True)
class MixtureConfig:
    groups: tuple[GroupConfig, ...]
    path: Path | None = None
    catalog: Path | None = None      # resolved path (default applied by `catalog_path`)
    shards: Path | None = None
    seed: int | None = None
    weight_unit: Literal["samples", "tokens"] = "samples"
    shuffle_window_blocks: int = DEFAULT_SHUFFLE_WINDOW_BLOCKS
    train: dict[str, Any] = field(default_factory=dict)
    stages: tuple[Stage, ...] = ()   # curriculum (pipelines/mixture/stages.py); () = the weights above throughout
    eval: Any = None                 # the raw `eval:` section (parsed by trainer/evaluation.py)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> "MixtureConfig":
        path = Path(path)
        if not path.is_file():
            raise MixtureConfigError(f"{path}: mixture config not found; pass the path of a dataset YAML "
                                     f"(for example configs/mixture_example_list.yaml)")
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)
        except CatalogError as exc:
            raise MixtureConfigError(f"{path}, {exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark is not None else ""
            raise MixtureConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)}); "
                                     f"fix the syntax there") from None
        return cls.from_dict(raw, path)

    @classmethod
    def from_dict(cls, raw: Any, path: str | Path | None = None) -> "MixtureConfig":
        path = Path(path) if path is not None else None
        base = path.resolve().parent if path is not None else Path.cwd()
        where = str(path) if path is not None else "<mixture config>"
        if not isinstance(raw, dict) or not raw:
            raise MixtureConfigError(f"{where}: must be a mapping of task kinds to dataset groups "
                                     f"(docs/upstream-compat.md#dataset-yaml), e.g. 'SftJSONLIterableDataset_Ver1: {{dataset_names: "
                                     f"[my_vqa], weight: 1}}'")

        def err(key: str | None, message: str, mapping: Any = raw) -> MixtureConfigError:
            line = getattr(mapping, "key_lines", {}).get(key) if key is not None else None
            line = line or getattr(mapping, "line", None)
            at = f", line {line}" if line else ""
            return MixtureConfigError(f"{where}{at}: {message}")

        groups: list[GroupConfig] = []
        for key, body in raw.items():
            if key in OUR_TOP_LEVEL_KEYS:
                continue
            groups.extend(_parse_groups(str(key), body, err, raw))
        if not groups:
            raise err(None, "names no dataset groups; add a task-kind key with dataset_names")
        names = [g.name for g in groups]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise err(None, f"group name(s) {sorted(dup)} appear twice; a grouped form yields `{{key}}_{{group}}`")
        if sum(g.weight for g in groups) <= 0:
            raise err(None, "all group weights are zero; give at least one group a positive weight")

        unit = raw.get("weight_unit", "samples")
        if unit not in ("samples", "tokens"):
            raise err("weight_unit", f"weight_unit must be 'samples' or 'tokens', got {unit!r}")
        seed = raw.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise err("seed", f"seed must be a whole number, got {seed!r}")
        window = raw.get("shuffle_window_blocks", DEFAULT_SHUFFLE_WINDOW_BLOCKS)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise err("shuffle_window_blocks", f"shuffle_window_blocks must be a positive whole number, got {window!r}")
        catalog = raw.get("catalog")
        shards = raw.get("shards")
        for k, v in (("catalog", catalog), ("shards", shards)):
            if v is not None and not isinstance(v, str):
                raise err(k, f"{k} must be a path, got {v!r}")
        train = raw.get("train") or {}
        stages = parse_stages(raw.get("stages"),
                              [(g.name, (g.task.name, g.task.upstream) if g.name == g.key else (), g.weight,
                                g.is_mandatory) for g in groups], err, raw)
        return cls(groups=tuple(groups), path=path, stages=stages,
                   catalog=_resolve(base, catalog) if catalog else None,
                   shards=_shards_location(base, shards) if shards else None,
                   seed=seed, weight_unit=unit, shuffle_window_blocks=window,
                   train=dict(train) if isinstance(train, dict) else {}, eval=raw.get("eval"))

    # -- derived ------------------------------------------------------------------------------------
    def catalog_path(self) -> Path:
        """The catalog this config names, or `<project root>/catalog/radiology.yaml`."""
        if self.catalog is not None:
            return self.catalog
        return project_root(self.path.resolve().parent if self.path is not None else Path.cwd()) / DEFAULT_CATALOG

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]

    def weights(self, step: int | None = None) -> list[float]:
        """Normalised group weights; with stages, those of the stage optimizer step `step` is in (the
        first stage when `step` is None)."""
        if self.stages:
            return normalised(self.stages[stage_index(self.stages, step or 0)].weights)
        return normalised([g.weight for g in self.groups])


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _no_repeats(names: list[str], label: str, err, body) -> None:
    """A dataset listed twice in one group would silently double its share: refuse it."""
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise err("dataset_names", f"{label} names {', '.join(map(repr, twice))} more than once; list each dataset "
                                   f"once and use weight (or a separate group) to change its share", body)


def _parse_groups(key: str, body: Any, err, top) -> list[GroupConfig]:
    try:
        task = resolve_task_kind(key)
    except UnknownTaskKind as exc:
        close = difflib.get_close_matches(key, OUR_TOP_LEVEL_KEYS, n=1, cutoff=0.7)
        extra = f" (or did you mean the top-level key {close[0]!r}?)" if close else ""
        raise err(key, f"top-level key {key!r}: {exc}{extra}", top) from None
    if not isinstance(body, dict):
        raise err(key, f"{key}: must be a mapping with dataset_names, weight, ...", top)
    for k in body:
        if k not in GROUP_KEYS:
            close = difflib.get_close_matches(str(k), GROUP_KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise err(k, f"{key}: unknown field {k!r}{hint}; allowed: {', '.join(GROUP_KEYS)}", body)

    def transform(name: str) -> ImageTransformArgs | None:
        value = body.get(name)
        if value is None:
            return None
        try:
            # Upstream YAML gives all three sizes; omitted max_pixels takes the upstream constructor default.
            if not isinstance(value, dict):
                raise ValueError(f"must be a mapping, got {type(value).__name__}")
            return ImageTransformArgs(**value)
        except (TypeError, ValueError) as exc:
            raise err(name, f"{key}.{name}: {exc}; give max_image_size, min_image_size, image_stride "
                            f"(and optionally max_pixels) as positive integers", body) from None

    vae, vit = transform("image_transform_args"), transform("vit_image_transform_args")
    shuffle_lines = body.get("shuffle_lines", True)
    if not isinstance(shuffle_lines, bool):
        raise err("shuffle_lines", f"{key}.shuffle_lines must be true or false, got {shuffle_lines!r}", body)
    shuffle_seed = body.get("shuffle_seed", 0)
    if not isinstance(shuffle_seed, int) or isinstance(shuffle_seed, bool):
        raise err("shuffle_seed", f"{key}.shuffle_seed must be a whole number, got {shuffle_seed!r}", body)

    names = body.get("dataset_names")
    if names is None:
        raise err(key, f"{key}: dataset_names is missing; list the catalog datasets of this group", body)

    def number(value: Any, field_name: str, group: str | None) -> float:
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value < 0):
            label = f"{key}.{field_name}" + (f"[{group}]" if group else "")
            raise err(field_name, f"{label} must be a finite number >= 0, got {value!r}", body)
        return float(value)

    def flag(value: Any, group: str | None) -> bool:
        if isinstance(value, dict):
            value = value.get(group, False)
        if not isinstance(value, bool):
            raise err("is_mandatory", f"{key}.is_mandatory must be true or false, got {value!r}", body)
        return value

    common = dict(key=key, task=task, shuffle_lines=shuffle_lines, shuffle_seed=shuffle_seed,
                  image_transform_args=vae, vit_image_transform_args=vit, line=getattr(top, "key_lines", {}).get(key))

    if isinstance(names, list):   # list form: one group named after the key
        if not names or not all(isinstance(n, str) for n in names):
            raise err("dataset_names", f"{key}.dataset_names must be a non-empty list of dataset names", body)
        _no_repeats(names, f"{key}.dataset_names", err, body)
        used = body.get("num_used_data")
        if used is None or used == 0:
            used = [0] * len(names)
        if isinstance(used, int) and not isinstance(used, bool):
            used = [used] * len(names)
        if not isinstance(used, list) or len(used) != len(names) or not all(_is_count(u) for u in used):
            raise err("num_used_data", f"{key}.num_used_data must be a list of {len(names)} whole numbers >= 0 "
                                       f"(one per dataset name; 0 = all rows), got {used!r}", body)
        weight = body.get("weight", 1.0)
        uses = tuple(DatasetUse(n, u if u > 0 else None) for n, u in zip(names, used))
        return [GroupConfig(name=key, datasets=uses, weight=number(weight, "weight", None),
                            is_mandatory=flag(body.get("is_mandatory", False), None), **common)]

    if not isinstance(names, dict) or not names:
        raise err("dataset_names", f"{key}.dataset_names must be a list of names or a mapping "
                                   f"{{group: [names]}}", body)
    groups = []
    weights = body.get("weight", 1.0)
    used = body.get("num_used_data") or {}
    if not isinstance(used, dict):
        raise err("num_used_data", f"{key}.num_used_data must be a mapping {{group: [start, end]}} in the "
                                   f"grouped form, got {used!r}", body)
    for extra_group in set(used) - set(names):
        raise err("num_used_data", f"{key}.num_used_data names group {extra_group!r}, which is not in "
                                   f"dataset_names ({', '.join(map(str, names))})", body)
    if isinstance(weights, dict):
        for extra_group in set(weights) - set(names):
            raise err("weight", f"{key}.weight names group {extra_group!r}, which is not in dataset_names "
                                f"({', '.join(map(str, names))})", body)
    for group, members in names.items():
        if isinstance(members, str):
            members = [members]
        if not isinstance(members, list) or not members or not all(isinstance(n, str) for n in members):
            raise err("dataset_names", f"{key}.dataset_names[{group}] must be a non-empty list of names", body)
        _no_repeats(members, f"{key}.dataset_names[{group}]", err, body)
        rng = used.get(group, [0, 0])
        if (not isinstance(rng, list) or len(rng) != 2 or not all(_is_count(v) for v in rng)
                or (rng[1] != 0 and rng[1] <= rng[0])):
            raise err("num_used_data", f"{key}.num_used_data[{group}] must be [start, end] with start < end "
                                       f"([0, 0] = all rows; end 0 = to the end), got {rng!r}", body)
        weight = weights.get(group, 1.0) if isinstance(weights, dict) else weights
        groups.append(GroupConfig(name=f"{key}_{group}", datasets=tuple(DatasetUse(n) for n in members),
                                  weight=number(weight, "weight", str(group)),
                                  is_mandatory=flag(body.get("is_mandatory", False), group),
                                  row_range=(rng[0], rng[1] or None), **common))
    return groups
