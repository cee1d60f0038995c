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
    warnings: list[str] = field(default_factory=list)


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


def convert(source: str, config_text: str | None = None, base: Path | None = None,
            task_map: dict[str, str] | None = None, filename: str = "<dataset_info.py>") -> LegacyResult:
    """Build catalog data (a dict ready for YAML) from dataset_info.py text and an optional training YAML."""
    registry, info, warnings = read_dataset_info(source, filename)
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
    for key, entries in info.items():
        if selection and key not in selection:
            continue
        chosen = selection.get(key, {})
        kind = None
        for candidate in (task_map.get(key), registry.get(key), key):
            if candidate:
                try:
                    kind = resolve_task_kind(candidate)
                    break
                except UnknownTaskKind:
                    continue
        if kind is None:
            warnings.append(f"{key}: class {registry.get(key, '?')} is not a task kind MedLoom ingests; skipped "
                            f"(map it with --task-map {key}=KIND if it reads UMV JSONL)")
            continue
        for name, fields in entries.items():
            if chosen.get("names") is not None and name not in chosen["names"]:
                continue
            if "jsonl_path" not in fields:
                warnings.append(f"{key}/{name}: no jsonl_path (parquet datasets are not ingested); skipped")
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
            group = chosen.get("group", {})
            for transform in ("image_transform_args", "vit_image_transform_args"):
                if isinstance(group.get(transform), dict):
                    entry[transform] = dict(group[transform])
            extras = sorted(set(fields) - {"jsonl_path", "data_dir"})
            if extras:
                entry["description"] = f"imported from {key}/{name} (upstream fields not used: {', '.join(extras)})"
            datasets.append(entry)
    if selection:
        for key, chosen in selection.items():
            missing = (chosen["names"] or set()) - set(info.get(key, {}))
            for name in sorted(missing):
                warnings.append(f"{key}/{name}: named in the training YAML but not in DATASET_INFO; skipped")
    if not datasets:
        raise LegacyError("no JSONL dataset could be converted: " + "; ".join(warnings or ["DATASET_INFO is empty"]))
    return LegacyResult({"datasets": datasets}, warnings)


def to_yaml(result: LegacyResult, source: str) -> str:
    header = (f"# Imported from {source} by jobs/import_legacy.py. Check the paths, then run:\n"
              f"#   python jobs/ingest.py <this file>\n")
    notes = "".join(f"# note: {w}\n" for w in result.warnings)
    return header + notes + yaml.safe_dump(result.catalog, sort_keys=False, allow_unicode=True, width=110)
