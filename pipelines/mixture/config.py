"""The mixture config: upstream UniMedVL/BAGEL dataset YAML (docs/upstream-compat.md#dataset-yaml), accepted unchanged.

Top-level keys are task kinds (upstream class names or our aliases); each holds one group (list form) or
several (grouped form: `dataset_names: {group: [names]}` -> groups named `{key}_{group}`). The optional
top-level keys are ours:

    catalog: catalog/radiology.yaml   # the dataset catalog; default: the one of catalog/*.yaml holding every name
    shards: shards                    # shard folder or s3://bucket/prefix; default: the catalog's output_dir
    seed: 42                          # data seed; default: the `seed` argument of MixtureStream
    weight_unit: samples              # or `tokens`: weights are shares of packed tokens
    stages: [...]                     # curriculum: weights by optimizer step (pipelines/mixture/stages.py)
    train: {...}                      # the trainer's section; ignored here

Relative paths resolve against the config file's folder. The jobs' `--catalog` / `--shards` flags win over
the keys (`MixtureConfig.with_locations`), so an upstream YAML runs unchanged. Without either, the catalog is
the one file of `catalog/*.yaml` (under the project root of the working directory and of the config) that
holds every dataset name (`find_catalog`). This module only parses and checks structure;
`pipelines.mixture.sources.resolve_sources` checks the names against the catalog and the shards.
"""
from __future__ import annotations

import dataclasses
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
CATALOG_FOLDER = "catalog"        # searched (*.yaml) when neither a catalog: key nor --catalog names one
DEFAULT_SHUFFLE_WINDOW_BLOCKS = 4


def _shards_location(base: Path, shards: str):
    """A local shard folder (relative to the config), or an object-storage prefix (`s3://bucket/prefix`,
    read through pyarrow.fs; see docs/cluster.md)."""
    from pipelines.storage import uris as storage

    return storage.as_path(shards) if storage.is_remote(shards) else _resolve(base, shards)


class MixtureConfigError(ValueError):
    """A user mistake in a mixture config (or in what it names). `str()` is the message to print; `problems`
    holds one line per mistake when several were found at once (each printed as its own `error:` line)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems) if problems else [message]
        super().__init__(message)

    @classmethod
    def of(cls, problems: list[str]) -> "MixtureConfigError":
        """One error carrying every problem (the first as its message)."""
        return cls(problems[0] if len(problems) == 1 else "\n".join(problems), problems)


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
    catalog_from: str = "catalog: key"   # how the catalog was chosen (printed by the jobs)

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

    def with_locations(self, catalog: str | Path | None = None, shards: str | Path | None = None,
                       base: Path | None = None) -> "MixtureConfig":
        """The jobs' `--catalog` / `--shards` flags, which win over the YAML's keys (relative paths resolve
        against `base`, the working directory by default). With no catalog at all, the one found by
        `find_catalog` is pinned here, so every process of a run (Ray workers included) reads the same."""
        base = Path(base or Path.cwd())
        out = self
        if shards:
            out = dataclasses.replace(out, shards=_shards_location(base, str(shards)))
        if catalog:
            return dataclasses.replace(out, catalog=_resolve(base, str(catalog)), catalog_from="--catalog")
        if out.catalog is None:
            found = find_catalog(out)
            return dataclasses.replace(out, catalog=found, catalog_from=f"found by dataset names in "
                                                                        f"{found.parent}/*.yaml")
        return out

    # -- derived ------------------------------------------------------------------------------------
    def catalog_path(self) -> Path:
        """The catalog this config names (key or flag), else the one of catalog/*.yaml that holds every
        dataset name of its groups (`find_catalog`; MixtureConfigError when none or several do)."""
        if self.catalog is not None:
            return self.catalog
        return find_catalog(self)

    @property
    def dataset_names(self) -> list[str]:
        """Every dataset name the groups list, once, in config order."""
        return list(dict.fromkeys(u.name for g in self.groups for u in g.datasets))

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]

    def weights(self, step: int | None = None) -> list[float]:
        """Normalised group weights; with stages, those of the stage optimizer step `step` is in (the
        first stage when `step` is None)."""
        if self.stages:
            return normalised(self.stages[stage_index(self.stages, step or 0)].weights)
        return normalised([g.weight for g in self.groups])


def add_location_flags(parser) -> None:
    """`--catalog` and `--shards` on an argparse parser (jobs/plan.py, jobs/stream.py; jobs/train.py has the
    same names in trainer/config.py): they win over the config's catalog: / shards: keys."""
    parser.add_argument("--catalog", help="catalog YAML (wins over the config's catalog: key; default: that key, "
                                          "else the one of catalog/*.yaml that lists every dataset name)")
    parser.add_argument("--shards", help="shard folder or s3://bucket/prefix (wins over the config's shards: "
                                         "key; default: that key, else the catalog's output_dir)")


def print_problems(exc: BaseException, file=None) -> None:
    """One `error:` line per problem (MixtureConfigError.problems, else the exception's message)."""
    import sys

    for line in getattr(exc, "problems", None) or [str(exc)]:
        print(f"error: {line}", file=file or sys.stderr)


def catalog_search_dirs(cfg: MixtureConfig) -> list[Path]:
    """`catalog/` under the project root of the working directory, then of the config file's folder."""
    starts = [Path.cwd()] + ([cfg.path.resolve().parent] if cfg.path is not None else [])
    return list(dict.fromkeys((project_root(s.resolve()) / CATALOG_FOLDER).resolve() for s in starts))


def _catalog_names(path: Path) -> list[str] | None:
    """Dataset names a catalog file lists (safe YAML, names only: `load_catalog` validates the chosen one);
    None when the file does not read as a catalog."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    entries = raw.get("datasets") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        return None
    return [str(e["name"]) for e in entries if isinstance(e, dict) and e.get("name") is not None]


def find_catalog(cfg: MixtureConfig) -> Path:
    """The one catalog of `catalog_search_dirs` whose datasets include every name of the mixture. A name no
    catalog holds, names spread over several catalogs, or several catalogs holding them all: a
    MixtureConfigError (one line per problem) that lists the catalogs searched and how to choose."""
    where = str(cfg.path) if cfg.path is not None else "<mixture config>"
    dirs = catalog_search_dirs(cfg)
    files = sorted({f.resolve() for d in dirs if d.is_dir() for f in (*d.glob("*.yaml"), *d.glob("*.yml"))})
    listing = {f: _catalog_names(f) for f in files}
    catalogs = {f: set(n) for f, n in listing.items() if n is not None}
    searched = ", ".join(str(f) for f in files) or f"none: no *.yaml in {', '.join(map(str, dirs))}"
    how = "add a 'catalog: PATH' key to the config or pass --catalog PATH"
    wanted = cfg.dataset_names
    holding = [f for f, names in catalogs.items() if set(wanted) <= names]
    if len(holding) == 1:
        return holding[0]
    if len(holding) > 1:
        raise MixtureConfigError(f"{where}: no catalog: key, and the dataset names ({', '.join(wanted)}) are in "
                                 f"several catalogs: {', '.join(map(str, holding))}; {how} to choose one")
    problems = []
    known = sorted(set().union(*catalogs.values())) if catalogs else []
    for name in wanted:
        if any(name in names for names in catalogs.values()):
            continue
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        problems.append(f"{where}: dataset {name!r} is in none of the catalogs searched (no catalog: key or "
                        f"--catalog): {searched}.{hint} Add it to a catalog, or {how}")
    if not problems:   # each name is somewhere, but no single catalog has them all
        spread = "; ".join(f"{f} has {', '.join(n for n in wanted if n in catalogs[f])}"
                           for f in catalogs if catalogs[f] & set(wanted))
        problems.append(f"{where}: no catalog: key, and no single catalog holds every dataset name ({spread}); "
                        f"a mixture reads one catalog: merge them, or {how}")
    raise MixtureConfigError.of(problems)


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
