"""Migration: turn an upstream `dataset_info.py` (DATASET_REGISTRY + DATASET_INFO) into a catalog manifest.

The Python file is read as data with `ast`, never executed. Values may be literals, names of earlier
top-level string constants, `+` concatenations, f-strings and `os.path.join(...)` of those; anything else
is reported and skipped. An optional upstream training YAML selects the datasets and supplies the
transform args of each group (weights and other mixing settings belong to the training config, not here).
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .catalog import NAME_PATTERN
from .task_kinds import UnknownTaskKind, resolve_task_kind


class LegacyError(ValueError):
    """The input cannot be converted at all (not Python, no DATASET_INFO, ...)."""


class _Unresolvable(Exception):
    pass


@dataclass
class LegacyResult:
    catalog: dict[str, Any]
    warnings: list[str] = field(default_factory=list)   # what was skipped or must be done by hand, and how
    notes: list[str] = field(default_factory=list)      # what was inferred (splits)


# BAGEL's Parquet-based dataset classes (and their usual registry keys): MedLoom reads such files through a
# Hugging Face source (`source: hf`, pipelines/ingest/hf_source.py), with the columns mapped by hand.
PARQUET_CLASSES = {
    "T2IIterableDataset": ("t2i", "question: CAPTION_COLUMN, output_images: [IMAGE_COLUMN]"),
    "UnifiedEditIterableDataset": ("edit", "question: INSTRUCTION_COLUMN, input_images: [SOURCE_IMAGE_COLUMN], "
                                           "output_images: [TARGET_IMAGE_COLUMN]"),
}
PARQUET_KEYS = {"t2i_pretrain": "T2IIterableDataset", "unified_edit": "UnifiedEditIterableDataset"}
# name suffix -> catalog split (the leakage check compares train against val / test)
SPLIT_SUFFIXES = (("_train", "train"), ("_validation", "val"), ("_valid", "val"), ("_val", "val"),
                  ("_test", "test"))


def infer_split(name: str) -> tuple[str, str] | None:
    """(split, suffix) from a `_train` / `_val` / `_test` name suffix (any case), else None."""
    lowered = name.lower()
    for suffix, split in SPLIT_SUFFIXES:
        if lowered.endswith(suffix) and len(lowered) > len(suffix):
            return split, name[-len(suffix):]
    return None


def _value(node: ast.AST, env: dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _Unresolvable("dict unpacking (**)")
        return {_value(k, env): _value(v, env) for k, v in zip(node.keys, node.values)}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e, env) for e in node.elts]
    if isinstance(node, ast.Name):
        if node.id in env:
            return env[node.id]
        raise _Unresolvable(f"name {node.id}")
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _value(node.left, env), _value(node.right, env)
        if isinstance(left, str) and isinstance(right, str):
            return left + right
        if isinstance(left, (int, float)) and isinstance(right, (int, float)):
            return left + right
        raise _Unresolvable("'+' of non-strings")
    if isinstance(node, ast.JoinedStr):
        parts = []
        for piece in node.values:
            if isinstance(piece, ast.FormattedValue):
                parts.append(str(_value(piece.value, env)))
            else:
                parts.append(str(_value(piece, env)))
        return "".join(parts)
    if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.path.join", "join", "osp.join"):
        import posixpath

        return posixpath.join(*[str(_value(a, env)) for a in node.args])
    raise _Unresolvable(ast.unparse(node)[:60])


def _class_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def read_dataset_info(source: str, filename: str = "<dataset_info.py>") -> tuple[dict, dict, list[str]]:
    """(registry {key: class name}, info {key: {dataset: fields}}, warnings) from the file's text."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        raise LegacyError(f"{filename}, line {exc.lineno}: not valid Python ({exc.msg})") from None
    env: dict[str, Any] = {}
    registry: dict[str, str] = {}
    info: dict[str, dict] | None = None
    warnings: list[str] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            target, value = stmt.targets[0].id, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            target, value = stmt.target.id, stmt.value
        else:
            continue
        if target == "DATASET_REGISTRY" and isinstance(value, ast.Dict):
            for k, v in zip(value.keys, value.values):
                if isinstance(k, ast.Constant) and _class_name(v):
                    registry[str(k.value)] = _class_name(v)
        elif target == "DATASET_INFO" and isinstance(value, ast.Dict):
            info = {}
            for k, group in zip(value.keys, value.values):
                if not isinstance(k, ast.Constant) or not isinstance(group, ast.Dict):
                    warnings.append(f"line {getattr(k, 'lineno', '?')}: skipped a DATASET_INFO entry that is not "
                                    f"'name': {{...}}")
                    continue
                entries: dict[str, dict] = {}
                for name_node, fields_node in zip(group.keys, group.values):
                    if not isinstance(name_node, ast.Constant) or not isinstance(fields_node, ast.Dict):
                        continue
                    fields: dict[str, Any] = {}
                    for fk, fv in zip(fields_node.keys, fields_node.values):
                        if not isinstance(fk, ast.Constant):
                            continue
                        try:
                            fields[str(fk.value)] = _value(fv, env)
                        except _Unresolvable as exc:
                            warnings.append(f"line {fv.lineno}: {k.value}/{name_node.value}: field {fk.value!r} "
                                            f"is computed ({exc}); fill it in by hand")
                    entries[str(name_node.value)] = fields
                info[str(k.value)] = entries
        else:
            try:
                env[target] = _value(value, env)
            except _Unresolvable:
                pass
    if info is None:
        raise LegacyError(f"{filename}: no top-level DATASET_INFO = {{...}} dict found")
    return registry, info, warnings


def _selection(config: dict | None) -> dict[str, dict]:
    """{registry key: {"names": set | None, "group": mapping}} from an upstream training YAML."""
    if config is None:
        return {}
    out = {}
    for key, group in config.items():
        if not isinstance(group, dict):
            continue
        names = group.get("dataset_names")
        if isinstance(names, dict):   # UMV grouped form {group: [names]}
            flat = {n for values in names.values() for n in (values or [])}
        elif isinstance(names, list):
            flat = set(names)
        else:
            flat = None
        out[str(key)] = {"names": flat, "group": group}
    return out


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
    return cleaned if NAME_PATTERN.match(cleaned) else f"d_{cleaned}"


def _parquet_hint(key: str, name: str, cls: str, fields: dict, base: Path | None) -> str:
    task, columns = PARQUET_CLASSES[cls]
    folder = fields.get("data_dir")
    if folder is not None and base is not None and not Path(str(folder)).is_absolute():
        folder = (base / str(folder)).resolve()
    return (f"skipped {key}/{name} ({cls}): it reads Parquet files{f' from {folder}' if folder else ''}; bring "
            f"it through the Hugging Face source with your column names: - {{name: {_safe_name(name)}, task: "
            f"{task}, source: hf, hf: {{path: {folder or 'DATA_DIR'}, {columns}}}}} "
            f"(docs/ingest.md#migrating-from-upstream-dataset_info)")


def _kind_of(key: str, registry: dict[str, str], task_map: dict[str, str]):
    """(task kind or None, the class name to report)."""
    for candidate in (task_map.get(key), registry.get(key), key):
        if candidate:
            try:
                return resolve_task_kind(candidate), registry.get(key) or key
            except UnknownTaskKind:
                continue
    return None, registry.get(key) or PARQUET_KEYS.get(key)


def convert(source: str, config_text: str | None = None, base: Path | None = None,
            task_map: dict[str, str] | None = None, filename: str = "<dataset_info.py>",
            tokenizer: str | None = None) -> LegacyResult:
    """Build catalog data (a dict ready for YAML) from dataset_info.py text and an optional training YAML.
    Every DATASET_INFO entry either becomes a catalog dataset or is named in a warning that says how to bring
    it; splits are inferred from `_train` / `_val` / `_test` name suffixes; `tokenizer` sets the catalog's."""
    registry, info, warnings = read_dataset_info(source, filename)
    notes: list[str] = []
    try:
        config = yaml.safe_load(config_text) if config_text else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise LegacyError(f"training YAML{where}: not valid YAML ({getattr(exc, 'problem', None) or exc}); "
                          f"fix the syntax there") from None
    if config is not None and not isinstance(config, dict):
        raise LegacyError("the training YAML must be a mapping of registry names to groups")
    selection = _selection(config)
    task_map = task_map or {}
    datasets: list[dict[str, Any]] = []
    used: set[str] = set()
    no_split: list[str] = []
    for key, entries in info.items():
        if selection and key not in selection:
            continue
        chosen = selection.get(key, {})
        kind, cls = _kind_of(key, registry, task_map)
        for name, fields in entries.items():
            if chosen.get("names") is not None and name not in chosen["names"]:
                continue
            if kind is None:
                if cls in PARQUET_CLASSES:
                    warnings.append(_parquet_hint(key, name, cls, fields, base))
                else:
                    what = (f"class {cls} is not a task kind MedLoom ingests" if cls else
                            f"registry key {key!r} has no class in DATASET_REGISTRY and is not a task kind")
                    warnings.append(f"skipped {key}/{name}: {what}; if it reads UniMedVL JSONL records, run again "
                                    f"with --task-map {key}=KIND (sft, text_only, t2i, edit, counterfactual, "
                                    f"vlm_sft, ...)")
                continue
            if "jsonl_path" not in fields:
                hint = (f"; if its data_dir holds Parquet files, bring it through the Hugging Face source "
                        f"(source: hf, hf.path: the folder; docs/ingest.md#migrating-from-upstream-dataset_info)"
                        if "data_dir" in fields else "")
                warnings.append(f"skipped {key}/{name} ({cls}): no jsonl_path{hint}")
                continue
            safe = _safe_name(name)
            if safe in used:
                safe = _safe_name(f"{key}_{name}")
            used.add(safe)
            entry: dict[str, Any] = {"name": safe, "task": kind.upstream}
            for path_key in ("jsonl_path", "data_dir"):
                value = fields.get(path_key)
                if value is None:
                    continue
                path = Path(str(value))
                if not path.is_absolute() and base is not None:
                    path = (base / path).resolve()
                entry[path_key] = str(path)
            split = infer_split(name)
            if split is not None:
                entry["split"] = split[0]
                notes.append(f"{safe}: split: {split[0]} (inferred from the '{split[1]}' suffix of {key}/{name})")
            else:
                no_split.append(safe)
            group = chosen.get("group", {})
            for transform in ("image_transform_args", "vit_image_transform_args"):
                if isinstance(group.get(transform), dict):
                    entry[transform] = dict(group[transform])
            extras = sorted(set(fields) - {"jsonl_path", "data_dir"})
            if extras:
                entry["description"] = f"imported from {key}/{name} (upstream fields not used: {', '.join(extras)})"
            datasets.append(entry)
    if no_split:
        notes.append(f"no split inferred for {', '.join(no_split)} (no _train/_val/_test suffix): set split: by "
                     f"hand so the leakage check can compare them")
    if selection:
        for key, chosen in selection.items():
            missing = (chosen["names"] or set()) - set(info.get(key, {}))
            for name in sorted(missing):
                warnings.append(f"{key}/{name}: named in the training YAML but not in DATASET_INFO; skipped")
    if not datasets:
        raise LegacyError("no JSONL dataset could be converted: " + "; ".join(warnings or ["DATASET_INFO is empty"]))
    catalog: dict[str, Any] = {"tokenizer": tokenizer} if tokenizer else {}
    catalog["datasets"] = datasets
    return LegacyResult(catalog, warnings, notes)


def to_yaml(result: LegacyResult, source: str) -> str:
    header = (f"# Imported from {source} by jobs/import_legacy.py. Check the paths, then run:\n"
              f"#   python jobs/ingest.py <this file>\n")
    notes = "".join(f"# note: {w}\n" for w in [*result.notes, *result.warnings])
    return header + notes + yaml.safe_dump(result.catalog, sort_keys=False, allow_unicode=True, width=110)
