"""Mutation score of the core rule modules: mutmut plants small bugs (an operator, a constant, a comparison)
in one module at a time and runs that module's unit tests against each; a mutant no test notices "survives".

Not part of CI (minutes per module). Needs mutmut >= 3.8 (`pip install -e '.[mutation]'`). Each module runs in its own
copy of the repository's tracked files under --work (mutmut writes a `mutants/` folder next to the code it
mutates), so the checkout is never touched. The report (--out, JSON and Markdown) lists per module the mutants
killed / survived / timed out / not covered, the score, the run time, and every survivor with its diff and
either the reason it is equivalent (scripts/mutation_equivalents.json) or "NOT KILLED".

Score = (killed + timed out) / (all - equivalent). See docs/testing.md#mutation-score.

    python scripts/mutation_check.py                              # every module (about 30 min on 2 cores)
    python scripts/mutation_check.py --module trainer/loss.py     # one module
    python scripts/mutation_check.py --report-only                # rebuild the report from the last runs
    python scripts/mutation_check.py --module M --resume          # finish a stopped run of M
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENTS = ROOT / "scripts" / "mutation_equivalents.json"
T = "tests/unit/"

# module -> the unit tests that own it
MODULES: dict[str, list[str]] = {
    "datasets_catalog/transforms.py": [T + "datasets_catalog/test_transforms.py"],
    "datasets_catalog/plan.py": [T + "datasets_catalog/test_sequence_plans.py", T + "pipelines/packing/test_packing.py"],
    "pipelines/mixture/order.py": [T + "pipelines/mixture/test_order_layers.py",
                                   T + "pipelines/mixture/test_mixture_order.py"],
    "pipelines/packing/position_ids.py": [T + "pipelines/packing/test_packing_ops.py",
                                          T + "pipelines/packing/test_packing_properties.py"],
    "pipelines/packing/masks.py": [T + "pipelines/packing/test_masks.py"],
    "trainer/loss.py": [T + "trainer/test_loss.py"],
    # the DICOM / NIfTI phantom tests also check encode_png, pixel_hash and the windows through the readers
    "pipelines/imaging/pixel_modes.py": [T + "pipelines/imaging/test_pixel_modes.py",
                                         T + "pipelines/imaging/test_pixel_rules.py",
                                         T + "pipelines/imaging/test_dicom_rules.py",
                                         T + "pipelines/imaging/test_nifti_rules.py"],
    "pipelines/imaging/dicom.py": [T + "pipelines/imaging/test_dicom_rules.py", T + "pipelines/imaging/test_dicom_io.py"],
    "pipelines/imaging/nifti.py": [T + "pipelines/imaging/test_nifti_io.py", T + "pipelines/imaging/test_nifti_rules.py"],
    "pipelines/ingest/chunk.py": [T + "pipelines/ingest/test_chunk.py", T + "pipelines/ingest/test_ingest.py"],
}
PACKAGES = ("datasets_catalog", "pipelines", "model", "trainer", "jobs")
# mutmut exit-code statuses -> our columns
COLUMNS = {"killed": "killed", "timeout": "timeout", "survived": "survived", "no tests": "no_tests",
           "suspicious": "suspicious", "segfault": "killed", "skipped": "skipped", "not checked": "not_checked"}


@dataclass
class ModuleResult:
    module: str
    tests: list[str]
    seconds: float = 0.0
    total: int = 0
    killed: int = 0
    timeout: int = 0
    survived: int = 0
    no_tests: int = 0
    suspicious: int = 0
    skipped: int = 0
    not_checked: int = 0
    equivalent: int = 0
    score: float = 0.0
    survivors: list[dict] = field(default_factory=list)   # name, diff, reason (equivalent) or None


def slug(module: str) -> str:
    return module.replace("/", "__").removesuffix(".py")


def make_workspace(work: Path, module: str, resume: bool = False) -> Path:
    """A fresh copy of the tracked files, with the mutmut section for this module in its pyproject.toml.
    With `resume`, the previous run's `mutants/` folder is kept: mutmut then runs only the mutants with no
    result yet (an interrupted run) and those of functions whose source changed since (it keys results by a
    hash of each function), and keeps every other verdict."""
    ws = work / slug(module)
    kept = work / (slug(module) + ".mutants-kept")
    if resume and (ws / "mutants").is_dir():
        shutil.rmtree(kept, ignore_errors=True)
        os.replace(ws / "mutants", kept)
    if ws.exists():
        shutil.rmtree(ws)
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (ws / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, ws / name)
    section = ["", "[tool.mutmut]", f"source_paths = {json.dumps(list(PACKAGES))}",
               f"only_mutate = {json.dumps([module])}",
               f"pytest_add_cli_args_test_selection = {json.dumps(MODULES[module])}",
               "pytest_add_cli_args = [\"-p\", \"no:cacheprovider\"]", "use_git_change_detection = false", ""]
    with open(ws / "pyproject.toml", "a", encoding="utf-8") as f:
        f.write("\n".join(section))
    if kept.is_dir():
        os.replace(kept, ws / "mutants")
        # mutmut's test-to-function map from the last run only learns about tests added since; a function added
        # since would be tested by those alone, so the map is rebuilt (one run of the module's tests)
        (ws / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    return ws


def mutmut(ws: Path, *args: str, capture: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CI")}
    env.update(PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    exe = Path(sys.executable).with_name("mutmut")
    return subprocess.run([str(exe), *args], cwd=ws, env=env, capture_output=capture, text=True)


def run_module(work: Path, module: str, max_children: int, log, only: list[str] | None = None,
               resume: bool = False) -> float:
    ws = make_workspace(work, module, resume)
    log(f"[mutation] {module}: mutmut run in {ws} (tests: {' '.join(MODULES[module])})")
    started = time.perf_counter()
    proc = mutmut(ws, "run", "--max-children", str(max_children), *(only or []))
    seconds = time.perf_counter() - started
    (ws / "mutmut_run.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        log(f"[mutation] {module}: mutmut exited {proc.returncode}; see {ws / 'mutmut_run.log'}")
    (ws / "mutation_seconds.txt").write_text(f"{seconds:.1f}\n")
    log(f"[mutation] {module}: {seconds:.0f} s")
    return seconds


def mutant_diff(mutated: Path, function: str) -> str:
    """The diff of one mutant against the original function, read from mutmut's mutated copy of the module
    (which holds `<name>__mutmut_orig` and every `<name>__mutmut_<n>`): the same lines `mutmut show` prints,
    without starting a mutmut process per survivor."""
    import difflib
    import re

    source = mutated.read_text(encoding="utf-8")
    base = function.rsplit("__mutmut_", 1)[0]

    def body(name: str) -> list[str]:
        found = re.search(r"^[ \t]*def " + re.escape(name) + r"\(.*?(?=^[ \t]*def |^[ \t]*class |^[A-Za-z_@]|\Z)",
                          source, re.S | re.M)   # methods are indented in mutmut's copy
        lines = found.group(0).splitlines() if found else [""]
        return [lines[0].replace(name, base, 1), *lines[1:]]   # same name in both, so the signature compares

    return "\n".join(difflib.unified_diff(body(base + "__mutmut_orig"), body(function), "original", "mutant",
                                          lineterm="", n=0))


def collect(work: Path, module: str, equivalents: dict[str, str]) -> ModuleResult:
    """Read mutmut's per-file results (mutants/<module>.meta) and the diff of every survivor."""
    ws = work / slug(module)
    res = ModuleResult(module, MODULES[module])
    meta_path = ws / "mutants" / (module + ".meta")
    if not meta_path.exists():
        return res
    res.seconds = float((ws / "mutation_seconds.txt").read_text()) if (ws / "mutation_seconds.txt").exists() else 0
    sys.path.insert(0, str(Path(sys.executable).parent))
    from mutmut.stats import status_by_exit_code

    codes = json.loads(meta_path.read_text())["exit_code_by_key"]
    for name, code in sorted(codes.items()):
        column = COLUMNS[status_by_exit_code.get(code, "not checked")]
        res.total += 1
        if column in ("killed", "timeout"):
            setattr(res, column, getattr(res, column) + 1)
            continue
        reason = equivalents.get(name)
        if reason:
            res.equivalent += 1
        else:
            setattr(res, column, getattr(res, column) + 1)
        if column == "not_checked":   # an interrupted run: counted, listed in the table only
            continue
        diff = mutant_diff(ws / "mutants" / module, name.rsplit(".", 1)[-1])
        res.survivors.append({"name": name, "status": column, "diff": diff, "equivalent": reason})
    counted = res.total - res.equivalent - res.not_checked   # an interrupted run scores what it checked
    res.score = (res.killed + res.timeout) / counted if counted else 1.0
    return res


def markdown(results: list[ModuleResult], target: float) -> str:
    lines = ["| module | mutants | killed | timed out | survived | not covered | equivalent | not run | score | "
             "run time |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        partial = " (interrupted run)" if r.not_checked else ""
        lines.append(f"| `{r.module}` | {r.total} | {r.killed} | {r.timeout} | {r.survived + r.suspicious} | "
                     f"{r.no_tests} | {r.equivalent} | {r.not_checked} | {100 * r.score:.1f} %{partial} | "
                     f"{r.seconds:.0f} s |")
    lines.append("")
    for r in results:
        if not r.survivors:
            continue
        lines.append(f"### {r.module}\n")
        for s in r.survivors:
            verdict = f"equivalent: {s['equivalent']}" if s["equivalent"] else f"NOT KILLED ({s['status']})"
            lines.append(f"- `{s['name']}`: {verdict}")
            body = [ln for ln in s["diff"].splitlines() if ln.startswith(("-", "+")) and not ln.startswith(("---", "+++"))]
            lines.extend(f"    {ln}" for ln in body[:6])
        lines.append("")
    below = [r.module for r in results if r.score < target]
    lines.append(f"Target {100 * target:.0f} % per module: " + ("met by every module." if not below else
                                                                 "NOT met by " + ", ".join(below) + "."))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Mutation score of the core rule modules (mutmut), one module at a "
                                            "time against its own unit tests; writes a JSON and a Markdown report.")
    p.add_argument("--module", action="append", choices=sorted(MODULES),
                   help="only this module (repeatable; default: all)")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "medloom-mutation",
                   help="folder for the per-module copies (default: $TMPDIR/medloom-mutation)")
    p.add_argument("--out", type=Path, default=Path("mutation-report"),
                   help="report prefix: writes OUT.json and OUT.md (default: mutation-report)")
    p.add_argument("--max-children", type=int, default=1, help="parallel mutant runs (default 1)")
    p.add_argument("--target", type=float, default=0.9, help="score every module must reach (default 0.9)")
    p.add_argument("--resume", action="store_true",
                   help="keep the last run's results in --work and run only the mutants without one (a stopped "
                        "run) or whose function changed since")
    p.add_argument("--report-only", action="store_true", help="do not run mutmut; report the last runs in --work")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="run only these mutants (mutmut names or globs), e.g. the survivors of a previous run; "
                        "the others are reported as not run")
    args = p.parse_args(argv)
    try:
        import mutmut as _  # noqa: F401
    except ImportError:
        print("error: mutmut is not installed; run: pip install -e '.[mutation]'", file=sys.stderr)
        return 2
    modules = args.module or list(MODULES)
    equivalents = json.loads(EQUIVALENTS.read_text()) if EQUIVALENTS.exists() else {}
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if not args.report_only:
        args.work.mkdir(parents=True, exist_ok=True)
        for module in modules:
            run_module(args.work, module, args.max_children, log, args.only, args.resume)
    results = [collect(args.work, m, equivalents) for m in modules]
    missing = [r.module for r in results if r.total == 0]
    if missing:
        print(f"error: no mutmut results for {', '.join(missing)} in {args.work}; run without --report-only",
              file=sys.stderr)
        return 2
    text = markdown(results, args.target)
    tmp_json, tmp_md = args.out.with_name(args.out.name + ".json.tmp"), args.out.with_name(args.out.name + ".md.tmp")
    tmp_json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    tmp_md.write_text(text)
    os.replace(tmp_json, args.out.with_name(args.out.name + ".json"))
    os.replace(tmp_md, args.out.with_name(args.out.name + ".md"))
    print(text)
    return 0 if all(r.score >= args.target for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
