"""The `medloom` console command (jobs/cli.py): every job as a sub-command, the same code as `python jobs/X.py`,
cheap `--help`, one-line errors; and the jobs keep the shim shape without sys.path hacks."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import jobs
from jobs import cli

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ("ingest", "report", "plan", "stream", "train", "plot", "vqa", "generate", "model-info", "import-legacy")


def medloom() -> list[str]:
    """The installed console script next to this interpreter, else the same entry point through `-m`."""
    script = Path(sys.executable).parent / "medloom"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "jobs.cli"]


def run(cmd: list[str], cwd: Path, timeout: int = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}      # the installed project, not a path hack
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_command_with_a_line(tmp_path):
    r = run([*medloom(), "--help"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert set(SHIPPED) <= set(cli.COMMANDS)
    for name, module in cli.COMMANDS.items():
        line = next((ln for ln in r.stdout.splitlines() if ln.split()[:1] == [name]), None)
        assert line is not None, f"{name} missing from medloom --help:\n{r.stdout}"
        assert cli.summary(module) and cli.summary(module) in line


def test_help_imports_no_job_module_and_neither_torch_nor_ray(tmp_path):
    code = ("import sys; from jobs import cli; cli.main(['--help']); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'pyarrow', 'numpy') "
            "or m in cli.COMMANDS.values()); print(heavy)")
    r = run([sys.executable, "-c", code], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_command_help_is_the_jobs_help_under_its_medloom_name(tmp_path):
    r = run([*medloom(), "plan", "--help"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: medloom plan ") and "--world-size" in r.stdout
    script = run([sys.executable, str(ROOT / "jobs" / "plan.py"), "--help"], cwd=tmp_path)
    assert script.returncode == 0, script.stderr
    assert script.stdout.startswith("usage: jobs/plan.py ")              # run as a script: named as before
    assert script.stdout.split("\n", 1)[1] == r.stdout.split("\n", 1)[1].replace("medloom plan", "jobs/plan.py")


@pytest.mark.parametrize("name", SHIPPED)
def test_every_command_help_names_medloom(name, capsys):
    try:
        code = cli.main([name, "--help"])
    except SystemExit as exc:                                           # argparse's --help
        code = exc.code
    assert code == 0
    assert f"usage: medloom {name}" in capsys.readouterr().out
    assert jobs.prog("jobs/x.py") == "jobs/x.py"                         # the name is restored afterwards


@pytest.mark.parametrize("argv, hint", [(["ingets"], "did you mean 'ingest'"), (["model_info"], "'model-info'"),
                                        (["--frobnicate"], "unknown option"), (["zzz"], "unknown command 'zzz'")])
def test_unknown_command_is_one_error_line_and_exit_2(argv, hint, capsys):
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("medloom: error: ") and hint in err


def test_unknown_command_through_the_console_script(tmp_path):
    r = run([*medloom(), "ingets", "x.yaml"], cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "error:" in r.stderr and "'ingest'" in r.stderr


def test_no_command_prints_the_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "commands:" in capsys.readouterr().err


# ---- the shim shape ----------------------------------------------------------------------------------
JOB_FILES = sorted(p for p in (ROOT / "jobs").glob("*.py") if p.name not in ("__init__.py", "cli.py"))


def test_every_job_file_is_a_command():
    assert {f"jobs.{p.stem}" for p in JOB_FILES} == set(cli.COMMANDS.values())


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_job_shape_main_argv_and_sys_exit(path):
    text = path.read_text()
    tree = ast.parse(text)
    mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert mains and [a.arg for a in mains[0].args.args] == ["argv"], f"{path.name}: main(argv) expected"
    assert text.rstrip().endswith('if __name__ == "__main__":\n    sys.exit(main())'), path.name


@pytest.mark.parametrize("path", [*sorted((ROOT / "jobs").glob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py"))],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_sys_path_hack(path):
    text = path.read_text()
    assert "noqa: E402" not in text, f"{path.name}: imports after a sys.path change"
    tree = ast.parse(text)
    top_level = [ast.unparse(n) for n in tree.body if "sys.path" in ast.unparse(n)
                 and not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    assert top_level == [], f"{path.name}: module-level sys.path change: {top_level}"
    if path.parent.name == "jobs":
        assert "sys.path" not in text, f"{path.name}: jobs import the installed project, no path changes"
