"""The README's Quickstart and "From data to a trained model" commands, run as written.

Every command of their ```bash blocks runs in a scratch copy of the shipped example (catalog/, configs/,
examples/), in order, as a separate process: it must exit 0 with no traceback. Where the README shows what a
command prints (the example ingest table), the printed table is compared with it. A command that is not run
here is listed in NOT_RUN with the reason; a command that is neither run nor listed fails the test, and so
does a NOT_RUN entry the README no longer shows.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.readme_table import readme_ingest_table, table_rows

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("## Quickstart", "## From data to a trained model")
NOT_RUN = {
    "python -m pytest -q": "the suite itself: .ci/run runs this very command (checked below)",
    "python jobs/ingest.py catalog/vqa_rad.yaml": "needs the reader's own VQA-RAD copy (not shipped, nothing is "
                                                  "downloaded); the hf source is tested in tests/unit",
    "python jobs/evaluate.py --model_path CK --catalog catalog/vqa_rad.yaml --datasets vqa_rad_test --out "
    "eval/vqa_rad": "the same VQA-RAD copy; evaluate runs end to end in tests/integration/model",
}
INSTALL = re.compile(r"^pip install -e (\.|'\.\[(\w+)\]')$")


def readme_commands(text: str) -> list[str]:
    """Commands of the ```bash blocks in SECTIONS, comments dropped, `\\` continuations joined, `&&` split."""
    commands: list[str] = []
    for heading in SECTIONS:
        start = text.index(heading + "\n")
        end = text.find("\n## ", start + len(heading))
        section = text[start:end if end != -1 else len(text)]
        for block in re.findall(r"```bash\n(.*?)```", section, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if not words:
                    continue
                joined = " ".join(shlex.quote(w) if w != "&&" else w for w in words)
                commands += [c.strip() for c in joined.split("&&")]
    return commands


def test_readme_commands_are_parsed_as_written():
    """The parser on a hand-written block (the expected list is written out, not computed)."""
    text = ("## Quickstart\n```bash\npip install -e . && python a.py x   # first\n"
            "python b.py --flag 'two words' \\\n    --more 1\n```\n## Other\n```bash\nnot me\n```\n"
            "## From data to a trained model\n```bash\npython c.py\n```\n")
    assert readme_commands(text) == ["pip install -e .", "python a.py x", "python b.py --flag 'two words' --more 1",
                                     "python c.py"]


def test_every_readme_command_is_run_or_excused():
    commands = readme_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    stale = [c for c in NOT_RUN if c not in commands]
    assert not stale, f"NOT_RUN lists commands the README no longer shows: {stale}"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in commands and "\npython -m pytest -q\n" in ci + "\n", \
        ".ci/run must run the README's test command"
    for command in commands:
        install = INSTALL.match(command)
        if install and install.group(2):
            extras = (ROOT / "pyproject.toml").read_text()
            assert re.search(rf"^{install.group(2)} = \[", extras, re.M), f"no [{install.group(2)}] extra"
            assert f"pip install --quiet -e '.[{install.group(2)}]'" in ci, ".ci/run must install it as shown"


def _scratch_copy(tmp: Path) -> Path:
    for name in ("catalog", "configs", "examples"):
        shutil.copytree(ROOT / name, tmp / name)
    (tmp / "jobs").symlink_to(ROOT / "jobs", target_is_directory=True)
    return tmp


def test_quickstart_and_recipe_run_as_written(tmp_path):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [c for c in readme_commands(text) if c not in NOT_RUN and not INSTALL.match(c)]
    cwd = _scratch_copy(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}     # Python's default warning filters, as a user has them
    env.pop("RAY_ADDRESS", None)
    shown_table = readme_ingest_table()
    outputs = []
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "python":
            argv[0] = sys.executable
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        outputs.append(out)
        assert proc.returncode == 0, f"`{command}` exited {proc.returncode}:\n{out[-4000:]}"
        assert "Traceback" not in out, f"`{command}` printed a traceback:\n{out[-4000:]}"
        if command.startswith(("python jobs/ingest.py", "python jobs/train.py")):   # quiet success
            assert not re.search(r"\b(Future|Deprecation)Warning\b", out), f"`{command}` warned:\n{out[-4000:]}"
    ingests = [o for c, o in zip(commands, outputs) if c == "python jobs/ingest.py catalog/radiology.yaml"]
    assert len(ingests) == 2, "the Quickstart and the recipe both ingest the example"
    assert table_rows(ingests[0]) == shown_table, "the README's ingest table is not what the ingest prints"
    again = [ln for ln in ingests[1].splitlines() if ln.startswith("[ingest] ")]
    assert len(again) == len(shown_table) - 1 and all(   # one line per dataset (the table also has TOTAL)
        ln.endswith(": up to date (inputs and settings unchanged), skipped") for ln in again), ingests[1]
    assert "local Ray" in ingests[0] and "local Ray" not in ingests[1], "README: running it again starts no Ray"
    for made in ("report.html", "curves.png", "ihc.png", "runs/radiology_sft/checkpoints/0000030/COMPLETE.json"):
        assert (cwd / made).exists(), f"{made} was not written"
