"""Catalog manifests: the shipped example loads; every user mistake is one CatalogError naming file, line, field."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from datasets_catalog.catalog import CatalogError, DatasetSpec, load_catalog, parse_catalog
from datasets_catalog.task_kinds import TASK_KINDS
from datasets_catalog.transforms import DEFAULT_VAE_ARGS, DEFAULT_VIT_ARGS, ImageTransformArgs
from pipelines.imaging.medical_hooks import register_medical_imaging

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _medical_options_checked():
    """What jobs/ingest.py does before it loads a catalog: the medical option validator is registered."""
    register_medical_imaging()


def test_shipped_catalog_covers_every_task_kind():
    cat = load_catalog(ROOT / "catalog" / "radiology.yaml")
    assert {spec.task.name for spec in cat.datasets.values()} == {k.name for k in TASK_KINDS}
    assert cat.output_dir == (ROOT / "shards").resolve()
    lines = sum(1 for spec in cat.datasets.values() for line in open(spec.jsonl_path) if line.strip())
    assert 20 <= lines <= 60
    edit = cat.datasets["he_to_ihc_edit"]
    assert edit.image_transform_args == ImageTransformArgs(512, 224, 16, DEFAULT_VAE_ARGS.max_pixels)
    assert cat.datasets["ct_mr_vqa"].vit_image_transform_args == DEFAULT_VIT_ARGS
    assert cat.datasets["radiology_text_qa"].data_dir is None


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "a.jsonl").write_text("{}\n")
    return tmp_path


def write(tree: Path, text: str) -> Path:
    path = tree / "c.yaml"
    path.write_text(text)
    return path


GOOD = """\
datasets:
  - name: a
    task: sft
    jsonl_path: a.jsonl
    data_dir: img
"""


def test_relative_paths_resolve_against_the_catalog(tree, monkeypatch):
    monkeypatch.chdir("/")
    cat = load_catalog(write(tree, GOOD + "    window: lung\n    options: {frame: middle}\n"))
    spec = cat.datasets["a"]
    assert isinstance(spec, DatasetSpec)
    assert spec.jsonl_path == (tree / "a.jsonl").resolve() and spec.data_dir == (tree / "img").resolve()
    assert spec.extra_options == {"window": "lung", "frame": "middle"}
    assert spec.image_transform_args == DEFAULT_VAE_ARGS and spec.vit_image_transform_args == DEFAULT_VIT_ARGS


def test_output_dir_and_tokenizer_resolve_against_the_catalog(tree):
    (tree / "tok").mkdir()
    cat = load_catalog(write(tree, "output_dir: out\ntokenizer: tok\n" + GOOD))
    assert cat.output_dir == (tree / "out").resolve() and cat.tokenizer == str((tree / "tok").resolve())
    assert load_catalog(write(tree, "tokenizer: builtin\n" + GOOD)).tokenizer == "builtin"


@pytest.mark.parametrize("text, field, words", [
    (GOOD.replace("task: sft", "task: sftt"), "task", ["unknown task kind", "sft", "line 3"]),
    (GOOD.replace("a.jsonl", "missing.jsonl"), "jsonl_path", ["file not found", "line 4"]),
    (GOOD.replace("data_dir: img", "data_dir: nope"), "data_dir", ["folder not found"]),
    (GOOD.replace("    data_dir: img\n", ""), "data_dir", ["is missing", "images"]),
    (GOOD + GOOD.replace("datasets:\n", ""), "name", ["duplicate dataset name", "line 2"]),
    (GOOD + "    image_transform_args: {max_image_size: 0}\n", "image_transform_args", ["positive integer"]),
    (GOOD + "    vit_image_transform_args: {min_image_size: 5000}\n", "vit_image_transform_args", ["larger"]),
    (GOOD + "    image_transform_args: {stride: 16}\n", "image_transform_args", ["unknown transform arg"]),
    (GOOD + "    jsonl: x\n", "jsonl", ["unknown field"]),
    (GOOD.replace("name: a", "name: ../evil"), "name", ["not a valid name"]),
    ("datasets: []\n", "datasets", ["non-empty list"]),
    ("outputdir: x\n" + GOOD, "outputdir", ["did you mean 'output_dir'"]),
    (GOOD + "max_reject_fraction: 2\n", "max_reject_fraction", ["between 0 and 1"]),
    ("tokenizer: no_such_dir\n" + GOOD, "tokenizer", ["folder not found", "builtin"]),
    (GOOD + "    window: lugn\n", "window", ["lugn"]),          # extension options are validated on load
])
def test_catalog_errors(tree, text, field, words):
    path = write(tree, text)
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    message = str(info.value)
    assert str(path) in message and f"field {field!r}" in message
    for word in words:
        assert word in message


def test_yaml_syntax_error_names_the_line(tree):
    with pytest.raises(CatalogError, match=r"line \d+: not valid YAML"):
        load_catalog(write(tree, "datasets:\n  - name: [a\n"))


def test_missing_catalog_file(tmp_path):
    with pytest.raises(CatalogError, match="catalog file not found"):
        load_catalog(tmp_path / "nope.yaml")


def test_select(tree):
    cat = load_catalog(write(tree, GOOD))
    assert [s.name for s in cat.select(["a"])] == ["a"]
    with pytest.raises(CatalogError, match="no dataset named 'b'"):
        cat.select(["b"])


def test_job_prints_one_line_and_exits_2(tree):
    path = write(tree, GOOD.replace("task: sft", "task: nope"))
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "ingest.py"), str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
    assert "unknown task kind 'nope'" in proc.stderr


# -- property tests --------------------------------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
transforms = st.fixed_dictionaries({}, optional={
    "max_image_size": st.integers(512, 2048), "min_image_size": st.integers(16, 512),
    "image_stride": st.sampled_from([14, 16]), "max_pixels": st.integers(10_000, 4_000_000)})
entries = st.fixed_dictionaries(
    {"name": names, "task": st.sampled_from([k.name for k in TASK_KINDS] + [k.upstream for k in TASK_KINDS]),
     "jsonl_path": st.just("a.jsonl"), "data_dir": st.just("img")},
    optional={"modality": st.sampled_from(["ct", "mr"]), "split": st.sampled_from(["train", "val"]),
              "image_transform_args": transforms, "vit_image_transform_args": transforms,
              "max_reject_fraction": st.floats(0, 1)})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(datasets=st.lists(entries, min_size=1, max_size=4, unique_by=lambda e: e["name"]))
def test_generated_catalogs_round_trip(tree, datasets):
    cat = parse_catalog(yaml.safe_dump({"datasets": datasets}), tree / "c.yaml")
    assert list(cat.datasets) == [d["name"] for d in datasets]
    for entry in datasets:
        spec = cat.datasets[entry["name"]]
        assert entry["task"] in (spec.task.name, spec.task.upstream)
        for key, default in (("image_transform_args", DEFAULT_VAE_ARGS), ("vit_image_transform_args",
                                                                          DEFAULT_VIT_ARGS)):
            expected = {**default.to_dict(), **entry.get(key, {})}
            assert getattr(spec, key).to_dict() == expected
        assert spec.split == entry.get("split")


yaml_junk = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                         lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=12), c, max_size=3),
                         max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=yaml_junk | st.fixed_dictionaries({"datasets": st.lists(
    st.dictionaries(st.sampled_from(["name", "task", "jsonl_path", "data_dir", "image_transform_args", "x"]),
                    yaml_junk, max_size=5), max_size=3)}))
def test_parser_only_raises_catalog_errors(tree, doc):
    try:
        parse_catalog(yaml.safe_dump(doc), tree / "c.yaml")
    except CatalogError as exc:
        assert str(exc).startswith(str(tree / "c.yaml"))
