"""The house rules of the package layout, read from the source with `ast` (function-level imports included):
no import cycles, no upward imports between the floors, small folders, and comments that cite only what is
in the repository."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLOORS = ("datasets_catalog", "pipelines", "model", "trainer", "jobs")     # lowest first
PIPELINE_FLOORS = ("storage", "imaging", "packing", "mixture", "ingest", "report")
CODE_SUFFIXES = {".py", ".sh", ".yaml", ".yml", ".toml"}
OUTSIDE_CITATION = re.compile(r"spec §|bagel-compat|data-loaders\.md|\b[Ii]ssues? #?\d+|\(#\d+\)")
MAX_MODULES_PER_FOLDER = 15


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Project modules one file imports: `from a.b import c` counts `a.b.c` when that is a module, else `a.b`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
    return found


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for floor in FLOORS for p in (ROOT / floor).rglob("*.py")}


@pytest.fixture(scope="module")
def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported_modules(path, known) for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of two or more modules are cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
    return cycles


def floor_of(module: str) -> int:
    return FLOORS.index(module.split(".")[0])


def pipeline_floor_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "pipelines" or len(parts) < 2 or parts[1] not in PIPELINE_FLOORS:
        return None
    return PIPELINE_FLOORS.index(parts[1])


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_the_import_reader_sees_function_level_and_relative_imports(tmp_path):
    source = ROOT / "pipelines" / "mixture" / "stream.py"
    known = set(project_modules())
    assert "pipelines.mixture.config" in imported_modules(source, known)


def test_no_import_cycles(import_graph):
    assert strongly_connected(import_graph) == []


def test_no_upward_imports_between_floors(import_graph):
    upward = sorted(f"{a} -> {b}" for a, deps in import_graph.items() for b in deps if floor_of(b) > floor_of(a))
    assert upward == []


def test_pipeline_stages_import_only_earlier_stages(import_graph):
    upward = sorted(f"{a} -> {b}" for a, deps in import_graph.items() for b in deps
                    if pipeline_floor_of(a) is not None and pipeline_floor_of(b) is not None
                    and pipeline_floor_of(b) > pipeline_floor_of(a))
    assert upward == []


def test_no_folder_holds_more_than_fifteen_modules():
    folders = [ROOT / floor for floor in FLOORS] + [p for floor in FLOORS for p in (ROOT / floor).rglob("*") if p.is_dir()]
    crowded = {str(f.relative_to(ROOT)): n for f in folders
               if (n := len([m for m in f.glob("*.py") if m.name != "__init__.py"])) > MAX_MODULES_PER_FOLDER}
    assert crowded == {}


def repository_files(suffixes: set[str]):
    """The project's own files: hidden folders (.git, .venv, caches) and virtual environments are not ours."""
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if path.suffix in suffixes and path.is_file() and not any(
                p.startswith(".") or p in {"venv", "build", "node_modules"} for p in parts[:-1]):
            yield path


def test_code_cites_only_what_is_in_the_repository():
    offending = []
    for path in repository_files(CODE_SUFFIXES):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE_CITATION.search(line) and path != Path(__file__).resolve():
                offending.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offending == []


def test_cited_sections_of_the_upstream_notes_exist():
    doc = (ROOT / "docs" / "upstream-compat.md").read_text()
    anchors = set(re.findall(r'<a id="([\w-]+)"></a>', doc))
    anchors |= {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", doc, flags=re.M)}
    cited = set()
    for path in repository_files(CODE_SUFFIXES | {".md"}):
        cited |= set(re.findall(r"upstream-compat\.md#([\w-]+)", path.read_text(errors="replace")))
    assert cited and cited <= anchors, sorted(cited - anchors)
