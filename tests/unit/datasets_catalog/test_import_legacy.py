"""jobs/import_legacy.py: an upstream DATASET_INFO (read with ast, never executed) becomes a valid catalog."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from datasets_catalog.catalog import load_catalog
from datasets_catalog.legacy import LegacyError, convert, infer_split

ROOT = Path(__file__).resolve().parents[3]

DATASET_INFO = '''\
import os
import this_module_does_not_exist            # proves the file is never executed
from interleave_datasets import MedicalImageEditingIterableDataset_ver1
raise SystemExit("executed!")

ROOT = "{root}"

DATASET_REGISTRY = {{
    't2i_pretrain': T2IIterableDataset,
    'vlm_sft': SftJSONLIterableDataset,
    'umv_sft': vlm.SftJSONLIterableDataset_Ver1,
    'med_edit': MedicalImageEditingIterableDataset_ver1,
    'custom': MyOwnDataset,
}}

DATASET_INFO = {{
    't2i_pretrain': {{'t2i': {{'data_dir': ROOT + '/parquet', 'num_files': 10}}}},
    'umv_sft': {{
        'chest_vqa': {{'data_dir': ROOT + '/images', 'jsonl_path': os.path.join(ROOT, 'vqa.jsonl'),
                       'num_total_samples': 3}},
        'unused': {{'data_dir': f'{{ROOT}}/images', 'jsonl_path': ROOT + '/vqa.jsonl'}},
    }},
    'med_edit': {{'stain': {{'data_dir': 'images', 'jsonl_path': 'vqa.jsonl'}}}},
    'custom': {{'x': {{'jsonl_path': 'vqa.jsonl'}}}},
}}
'''

CONFIG = """\
umv_sft:
  dataset_names: [chest_vqa]
  image_transform_args: {max_image_size: 512, min_image_size: 256, image_stride: 16}
  vit_image_transform_args: {max_image_size: 518, min_image_size: 224, image_stride: 14}
  weight: [1.0]
med_edit:
  dataset_names: {histo: [stain]}
"""


@pytest.fixture
def legacy(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "vqa.jsonl").write_text("{}\n")
    info = tmp_path / "dataset_info.py"
    info.write_text(DATASET_INFO.format(root=tmp_path))
    config = tmp_path / "example.yaml"
    config.write_text(CONFIG)
    return tmp_path, info, config


def test_import_with_config(legacy):
    tmp_path, info, config = legacy
    out = tmp_path / "catalog" / "imported.yaml"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "import_legacy.py"), str(info), str(config),
                           "--out", str(out), "--base", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cat = load_catalog(out)
    assert list(cat.datasets) == ["chest_vqa", "stain"]
    vqa, stain = cat.datasets["chest_vqa"], cat.datasets["stain"]
    assert vqa.task.name == "sft" and stain.task.name == "edit"
    assert vqa.jsonl_path == tmp_path / "vqa.jsonl" and stain.data_dir == tmp_path / "images"
    assert vqa.image_transform_args.max_image_size == 512 and vqa.vit_image_transform_args.image_stride == 14
    assert "num_total_samples" in vqa.description


def test_import_without_config_reports_what_it_skips(legacy):
    tmp_path, info, _ = legacy
    result = convert(info.read_text(), base=tmp_path)
    names = [d["name"] for d in result.catalog["datasets"]]
    assert names == ["chest_vqa", "unused", "stain"]
    text = " ".join(result.warnings)
    assert "skipped t2i_pretrain/t2i (T2IIterableDataset): it reads Parquet files" in text
    assert "skipped custom/x: class MyOwnDataset is not a task kind" in text and "class ?" not in text
    mapped = convert(info.read_text(), base=tmp_path, task_map={"custom": "text_only"})
    assert [d["name"] for d in mapped.catalog["datasets"]][-1] == "x"


def test_errors(tmp_path):
    with pytest.raises(LegacyError, match="no top-level DATASET_INFO"):
        convert("X = 1\n")
    with pytest.raises(LegacyError, match="line 1: not valid Python"):
        convert("DATASET_INFO = {\n")
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "import_legacy.py"), str(tmp_path / "nope.py")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


def test_bad_training_yaml_and_non_utf8_input_are_one_clear_error(tmp_path):
    info = 'DATASET_INFO = {"x": {"a": {"jsonl_path": "a.jsonl"}}}\n'
    with pytest.raises(LegacyError, match="training YAML, line 2: not valid YAML"):
        convert(info, "a: [1,\n")
    (tmp_path / "info.py").write_text(info)
    (tmp_path / "binary.yaml").write_bytes(b"a: \xff\xfe\n")
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "import_legacy.py"), str(tmp_path / "info.py"),
                           str(tmp_path / "binary.yaml")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "binary.yaml: not UTF-8" in proc.stderr and "Traceback" not in proc.stderr


UPSTREAM = """\
from .interleave_datasets import UnifiedEditIterableDataset
from .t2i_dataset import T2IIterableDataset

DATASET_REGISTRY = {
    't2i_pretrain': T2IIterableDataset,
    'unified_edit': UnifiedEditIterableDataset,
    'umv_sft': SftJSONLIterableDataset_Ver1,
}

DATASET_INFO = {
    't2i_pretrain': {'t2i': {'data_dir': 'bagel_example/t2i', 'num_files': 10, 'num_total_samples': 1000}},
    'unified_edit': {
        'seedxedit_multi': {'data_dir': 'bagel_example/editing/seedxedit_multi', 'num_files': 10,
                            'parquet_info_path': 'bagel_example/editing/parquet_info/seedxedit_multi_nas.json'},
    },
    'umv_sft': {
        'chest_vqa_train': {'data_dir': 'images', 'jsonl_path': 'vqa.jsonl'},
        'chest_vqa_val': {'data_dir': 'images', 'jsonl_path': 'vqa.jsonl'},
        'Chest_VQA_TEST': {'data_dir': 'images', 'jsonl_path': 'vqa.jsonl'},
        'chest_vqa_extra': {'data_dir': 'images', 'jsonl_path': 'vqa.jsonl'},
        'no_jsonl': {'data_dir': 'parquet_dir'},
    },
    'mystery': {'m': {'jsonl_path': 'vqa.jsonl'}},
}
"""


@pytest.fixture
def upstream(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "vqa.jsonl").write_text("{}\n")
    (tmp_path / "dataset_info.py").write_text(UPSTREAM)
    (tmp_path / "tok").mkdir()
    return tmp_path


def test_splits_come_from_name_suffixes_and_are_printed(upstream):
    out = upstream / "mine.yaml"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "import_legacy.py"), str(upstream / "dataset_info.py"),
                           "--out", str(out), "--base", str(upstream)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cat = load_catalog(out)
    splits = {name: spec.split for name, spec in cat.datasets.items()}
    assert splits == {"chest_vqa_train": "train", "chest_vqa_val": "val", "Chest_VQA_TEST": "test",
                      "chest_vqa_extra": None}
    lines = proc.stderr.splitlines()
    assert "note: chest_vqa_train: split: train (inferred from the '_train' suffix of umv_sft/chest_vqa_train)" in lines
    assert "note: Chest_VQA_TEST: split: test (inferred from the '_TEST' suffix of umv_sft/Chest_VQA_TEST)" in lines
    assert any(line.startswith("note: no split inferred for chest_vqa_extra") for line in lines)
    assert "Traceback" not in proc.stderr


def test_every_skipped_entry_is_named_with_how_to_bring_it(upstream):
    result = convert((upstream / "dataset_info.py").read_text(), base=upstream)
    skipped = {w.split()[1].rstrip(":"): w for w in result.warnings if w.startswith("skipped ")}
    assert sorted(skipped) == ["mystery/m", "t2i_pretrain/t2i", "umv_sft/no_jsonl", "unified_edit/seedxedit_multi"]
    t2i, edit = skipped["t2i_pretrain/t2i"], skipped["unified_edit/seedxedit_multi"]
    assert "(T2IIterableDataset): it reads Parquet files from " + str(upstream / "bagel_example" / "t2i") in t2i
    assert "task: t2i, source: hf, hf: {path: " + str(upstream / "bagel_example" / "t2i") in t2i
    assert "output_images: [IMAGE_COLUMN]" in t2i
    assert "(UnifiedEditIterableDataset)" in edit and "task: edit, source: hf" in edit and "input_images:" in edit
    assert "Hugging Face source" in skipped["umv_sft/no_jsonl"]
    assert "'mystery' has no class in DATASET_REGISTRY" in skipped["mystery/m"]
    assert "--task-map mystery=KIND" in skipped["mystery/m"]
    assert all("class ?" not in w for w in result.warnings)


def test_tokenizer_option_sets_the_catalogs_tokenizer(upstream):
    script = [sys.executable, str(ROOT / "jobs" / "import_legacy.py"), str(upstream / "dataset_info.py"),
              "--base", str(upstream)]
    for value, expected in (("builtin", "builtin"), (str(upstream / "tok"), str(upstream / "tok"))):
        out = upstream / f"cat-{value.replace('/', '_')}.yaml"
        proc = subprocess.run(script + ["--tokenizer", value, "--out", str(out)], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert yaml.safe_load(out.read_text())["tokenizer"] == expected
    proc = subprocess.run(script + ["--tokenizer", "tok"], capture_output=True, text=True, timeout=60,
                          cwd=upstream)   # relative to the current folder, written absolute
    assert proc.returncode == 0 and yaml.safe_load(proc.stdout)["tokenizer"] == str(upstream / "tok")
    proc = subprocess.run(script + ["--tokenizer", str(upstream / "nope")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --tokenizer") and "Traceback" not in proc.stderr
    assert "tokenizer" not in convert((upstream / "dataset_info.py").read_text(), base=upstream).catalog


def test_the_readme_example_prints_what_the_readme_shows(tmp_path):
    """README "Bringing existing data": the command on examples/upstream/dataset_info.py, its output pasted."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("$ python jobs/import_legacy.py examples/upstream/dataset_info.py", 1)[1].split("```")[0]
    shown = block.split("\n", 2)[2].rstrip("\n")      # after the command's two lines
    out = tmp_path / "catalog" / "imported.yaml"
    proc = subprocess.run([sys.executable, "jobs/import_legacy.py", "examples/upstream/dataset_info.py", "--base",
                           "examples/radiology", "--tokenizer", "builtin", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stderr.replace(str(ROOT), "/home/you/medloom").replace(str(out), "catalog/imported.yaml")
    assert printed.rstrip("\n") == shown
    cat = load_catalog(out)
    assert {n: s.split for n, s in cat.datasets.items()} == {
        "ct_mr_vqa_train": "train", "radiology_text_qa_val": "val", "fundus_t2i": None, "he_to_ihc_edit_test": "test"}
    assert cat.tokenizer == "builtin"


@settings(max_examples=300, deadline=None)
@given(base=st.text(alphabet="abcXYZ019_-.", min_size=1, max_size=12),
       suffix=st.sampled_from(["_train", "_TRAIN", "_val", "_Val", "_valid", "_validation", "_test", "_Test", "",
                               "train", "-val", "_testing", "_trains"]))
def test_split_inference_reads_only_the_three_suffixes(base, suffix):
    expected = {"_train": "train", "_val": "val", "_valid": "val", "_validation": "val", "_test": "test"}
    got = infer_split(base + suffix)
    if suffix.lower() in expected:
        assert got == (expected[suffix.lower()], suffix)
    elif got is not None:   # only when the generated base itself ends with one of the suffixes
        assert (base + suffix).lower().endswith(("_train", "_val", "_valid", "_validation", "_test"))
