"""The bugs an audit planted by hand in the core rules, planted again one at a time in a copy of the repository:
each must make at least one unit test of its module fail. Not part of CI (about 2 minutes); see
docs/testing.md#planted-bugs.

    python scripts/planted_bugs.py            # every bug; exit 1 if one survives
    python scripts/planted_bugs.py --list     # the bugs and the tests that must catch them
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bug:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


BUGS = (
    Bug("resize rule: round-half-up instead of banker's rounding", "datasets_catalog/transforms.py",
        "return max(stride, int(round(value / stride) * stride))",
        "return max(stride, int(value / stride + 0.5) * stride)",
        ("tests/unit/datasets_catalog/test_transforms.py",)),
    Bug("loss: reweighted CE divided by the token count", "trainer/loss.py",
        "return float(batch.ce_loss_weights.double().sum())", "return float(batch.num_ce_tokens)",
        ("tests/unit/trainer/test_loss.py",)),
    Bug("loss: MSE denominator of the last micro-batch only", "trainer/loss.py",
        "float(sum(b.num_mse_tokens for b in batches))", "float(batches[-1].num_mse_tokens)",
        ("tests/unit/trainer/test_loss.py",)),
    Bug("DICOM: MONOCHROME1 inverted against 255 under keep_16bit", "pipelines/imaging/dicom.py",
        "shown = out_max - shown", "shown = 255 - shown",
        ("tests/unit/pipelines/imaging/test_dicom_io.py",)),
    Bug("ingest: too_long rejects not counted in rejects_by_reason", "pipelines/ingest/chunk.py",
        "                self.reject(item.line_number, exc if isinstance(exc, RecordError)",
        "                (lambda n, e, r: self.rejects.append({'line_number': n, 'reason': e.reason}))"
        "(item.line_number, exc if isinstance(exc, RecordError)",
        ("tests/unit/pipelines/ingest/test_ingest.py",)),
    Bug("mixture order: a round of a small dataset one pass short (floor instead of ceiling)",
        "pipelines/mixture/order.py",
        "return rows * max(1, -(-slots // max(1, rows)))", "return rows * max(1, slots // max(1, rows))",
        ("tests/unit/pipelines/mixture/test_mixture_order.py",)),
)


def copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)


def plant(work: Path, bug: Bug) -> subprocess.CompletedProcess:
    """Apply the bug in a fresh copy and run its tests there (-x: the first failure is enough)."""
    src = work / "src"
    if src.exists():
        shutil.rmtree(src)
    copy_tree(src)
    target = src / bug.path
    text = target.read_text()
    if text.count(bug.old) != 1:
        raise SystemExit(f"error: {bug.path}: the code to replace for {bug.name!r} is not there exactly once; "
                         f"update scripts/planted_bugs.py")
    target.write_text(text.replace(bug.old, bug.new))
    env = {**os.environ, "PYTHONPATH": str(src)}
    env.pop("CI", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *bug.tests],
                          cwd=src, env=env, capture_output=True, text=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Plant each known bug in a copy of the repository and check that "
                                            "its unit tests fail.")
    p.add_argument("--list", action="store_true", help="list the bugs and their tests, plant nothing")
    args = p.parse_args(argv)
    if args.list:
        for bug in BUGS:
            print(f"{bug.name}: {bug.path}; {' '.join(bug.tests)}")
        return 0
    survived = 0
    with tempfile.TemporaryDirectory(prefix="medloom-planted-") as tmp:
        for bug in BUGS:
            proc = plant(Path(tmp), bug)
            failed = [ln.split(" - ")[0].removeprefix("FAILED ") for ln in proc.stdout.splitlines()
                      if ln.startswith("FAILED ")]
            caught = proc.returncode == 1 and failed
            survived += not caught
            verdict = f"caught by {failed[0]}" if caught else f"NOT CAUGHT (pytest exit {proc.returncode})"
            print(f"{bug.name}: {verdict}", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
