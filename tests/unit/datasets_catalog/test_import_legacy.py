"""jobs/import_legacy.py: an upstream DATASET_INFO (read with ast, never executed) becomes a valid catalog."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from datasets_catalog.catalog import load_catalog
from datasets_catalog.legacy import LegacyError, convert

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
    assert "t2i_pretrain: class T2IIterableDataset is not" in text and "custom: class MyOwnDataset" in text
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
