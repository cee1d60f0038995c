"""Mixture config: upstream YAML (list and grouped forms) loads unchanged; every user mistake gets one
clear message; config transforms that differ from the shards' are recomputed from stored sizes."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from datasets_catalog.tokenizer import TextTokenizer
from datasets_catalog.transforms import ImageTransformArgs
from pipelines.mixture.stream import MixtureStream
from pipelines.mixture.config import MixtureConfig, MixtureConfigError
from pipelines.mixture.sources import resolve_sources
from pipelines.packing.config import PackingConfig
from tests.helpers.shard_factory import make_catalog, make_dataset, tiny, write_config

ROOT = Path(__file__).resolve().parents[4]


@pytest.fixture(scope="module")
def example_catalog(tmp_path_factory):
    """A catalog naming the datasets of configs/mixture_example_*.yaml (docs/upstream-compat.md#dataset-yaml examples)."""
    root = tmp_path_factory.mktemp("examples")
    return make_catalog(root, [tiny("medical_vqa_sft", "sft", 30), tiny("medical_report_sft", "sft", 1200,
                                                                        distinct=10, rows_per_file=600,
                                                                        rows_per_row_group=100),
                               tiny("medical_image_editing", "edit", 12), tiny("medical_t2i", "t2i", 9)])


def with_catalog(cfg: MixtureConfig, catalog: Path) -> MixtureConfig:
    return dataclasses.replace(cfg, catalog=catalog)


def test_upstream_list_example_loads_unchanged(example_catalog):
    cfg = MixtureConfig.from_yaml(ROOT / "configs/mixture_example_list.yaml")
    assert cfg.catalog is None
    with pytest.raises(MixtureConfigError, match="none of the catalogs searched"):   # its names are in no catalog/*.yaml
        cfg.catalog_path()
    resolved = resolve_sources(with_catalog(cfg, example_catalog))
    groups = {g.name: g for g in resolved.groups}
    assert list(groups) == ["SftJSONLIterableDataset_Ver1", "MedicalImageEditingIterableDataset_ver1",
                            "T2IIterableDataset_Ver1"]
    sft = groups["SftJSONLIterableDataset_Ver1"]
    assert sft.config.is_mandatory and sft.total == 30 + 1000          # num_used_data: [0 = all, first 1000]
    assert groups["T2IIterableDataset_Ver1"].config.image_transform_args == ImageTransformArgs(1024, 512, 16)
    assert cfg.weights() == pytest.approx([0.5, 0.25, 0.25])
    assert any("recomputed" in n for n in resolved.notes)            # example transforms != the tiny shards'
    s = MixtureStream(with_catalog(cfg, example_catalog), PackingConfig(), TextTokenizer.builtin(), resolved=resolved)
    for _ in range(3):
        plan = s.next_plan()
        assert "SftJSONLIterableDataset_Ver1" in plan.metrics["samples_per_group"]


def test_upstream_grouped_example_loads_unchanged(example_catalog):
    cfg = MixtureConfig.from_yaml(ROOT / "configs/mixture_example_grouped.yaml")
    resolved = resolve_sources(with_catalog(cfg, example_catalog))
    groups = {g.name: g for g in resolved.groups}
    assert list(groups) == ["SftJSONLIterableDataset_Ver1_vqa", "SftJSONLIterableDataset_Ver1_report",
                            "MedicalImageEditingIterableDataset_ver1_stain"]
    assert groups["SftJSONLIterableDataset_Ver1_vqa"].total == 30
    assert groups["SftJSONLIterableDataset_Ver1_report"].total == 1000   # [0, 1000]
    assert cfg.weights() == pytest.approx([0.5, 0.25, 0.25])


def test_aliases_train_section_and_our_keys(example_catalog, tmp_path):
    path = write_config(tmp_path / "c.yaml", f"""
catalog: {example_catalog}
seed: 7
weight_unit: tokens
sft: {{dataset_names: [medical_vqa_sft], weight: 3}}
t2i: {{dataset_names: [medical_t2i]}}
train: {{lr: 0.001, expected_num_tokens: 2048}}
""")
    cfg = MixtureConfig.from_yaml(path)
    assert (cfg.seed, cfg.weight_unit, cfg.train["lr"]) == (7, "tokens", 0.001)
    assert [g.task.name for g in cfg.groups] == ["sft", "t2i"]
    assert resolve_sources(cfg).groups[1].total == 9


def _err(tmp_path, text: str, resolve: bool = True) -> str:
    path = write_config(tmp_path / "bad.yaml", text)
    with pytest.raises(MixtureConfigError) as info:
        cfg = MixtureConfig.from_yaml(path)
        if resolve:
            resolve_sources(cfg)
    return str(info.value)


def test_unknown_dataset_names_close_matches(example_catalog, tmp_path):
    msg = _err(tmp_path, f"catalog: {example_catalog}\nsft: {{dataset_names: [medical_vqa_stf]}}\n")
    assert "medical_vqa_stf" in msg and "medical_vqa_sft" in msg and "bad.yaml" in msg


def test_no_shards_yet_says_which_ingest_command_to_run(tmp_path):
    catalog = make_catalog(tmp_path / "c", [tiny("fresh", "sft", 3)], write_shards=False)
    msg = _err(tmp_path, f"catalog: {catalog}\nsft: {{dataset_names: [fresh]}}\n")
    assert f"python jobs/ingest.py {catalog} --only fresh" in msg


def test_all_zero_weights(example_catalog, tmp_path):
    msg = _err(tmp_path, f"catalog: {example_catalog}\nsft: {{dataset_names: [medical_vqa_sft], weight: 0}}\n",
               resolve=False)
    assert "weights are zero" in msg


def test_task_kind_mismatch_with_catalog(example_catalog, tmp_path):
    msg = _err(tmp_path, f"catalog: {example_catalog}\nT2IIterableDataset_Ver1: {{dataset_names: [medical_vqa_sft]}}\n")
    assert "medical_vqa_sft" in msg and "SftJSONLIterableDataset_Ver1" in msg and "line 2" in msg


@pytest.mark.parametrize("text,needle", [
    ("sft: {dataset_names: [a], wieght: 2}\n", "did you mean 'weight'"),
    ("SftJSONLIterableDataset_Ver2: {dataset_names: [a]}\n", "unknown task kind"),
    ("sft: {dataset_names: [a, b], num_used_data: [1]}\n", "num_used_data"),
    ("sft: {dataset_names: {g: [a]}, num_used_data: {g: [5, 2]}}\n", "start < end"),
    ("sft: {dataset_names: {g: [a]}, weight: {h: 1}}\n", "not in dataset_names"),
    ("sft: {dataset_names: [a]}\nweight_unit: bytes\n", "weight_unit"),
    ("sft: {dataset_names: [a], image_transform_args: {max_image_size: 10}}\n", "image_transform_args"),
    ("sft: [a]\n", "mapping"),
    ("sft: {dataset_names: [a]}\nsft: {dataset_names: [b]}\n", "twice"),
])
def test_structural_errors_name_the_field(tmp_path, text, needle):
    assert needle in _err(tmp_path, text, resolve=False)


values = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(-1, 3, allow_nan=False)
                      | st.sampled_from(["a", "sft", "vqa"]),
                      lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
                          ["dataset_names", "weight", "num_used_data", "is_mandatory", "g", "shuffle_lines",
                           "shuffle_seed", "image_transform_args"]), c, max_size=4), max_leaves=10)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["sft", "t2i", "edit", "seed", "weight_unit", "catalog", "train", "bogus"]),
                       values, max_size=3))
def test_parser_never_crashes(raw):
    try:
        cfg = MixtureConfig.from_dict(raw)
    except MixtureConfigError as exc:
        assert str(exc)
    else:
        assert cfg.groups and sum(g.weight for g in cfg.groups) > 0


def test_recomputed_sizes_match_shards_built_with_those_transforms(tmp_path):
    vae, vit = ImageTransformArgs(96, 48, 16), ImageTransformArgs(84, 42, 14, max_pixels=84 * 84)
    catalog = make_catalog(tmp_path / "a", [tiny("vqa", "sft", 20)])
    other = make_dataset(tmp_path / "b", dataclasses.replace(tiny("vqa", "sft", 20), image_transform_args=vae,
                                                             vit_image_transform_args=vit))
    expected = {r["sample_id"]: r["num_tokens"] for r in
                __import__("pandas").read_parquet(other).to_dict("records")}
    cfg = MixtureConfig.from_yaml(write_config(tmp_path / "c.yaml", f"""
catalog: {catalog}
sft:
  dataset_names: [vqa]
  image_transform_args: {yaml.safe_dump(vae.to_dict(), default_flow_style=True).strip()}
  vit_image_transform_args: {yaml.safe_dump(vit.to_dict(), default_flow_style=True).strip()}
"""))
    s = MixtureStream(cfg, PackingConfig(expected_num_tokens=2000, max_num_tokens=4000, max_num_tokens_per_sample=2000,
                                         prefer_buffer_before=1000), TextTokenizer.builtin())
    assert len(s.resolved.notes) == 1
    plan = s.next_plan()
    assert plan.members and all(m.cost == expected[m.sample.sample_id] for m in plan.members)
    full = s.full_sample(plan.members[0])
    assert full.row["input_images"][0]["vae_width"] <= 96 and full.row["num_tokens"] == plan.members[0].cost
