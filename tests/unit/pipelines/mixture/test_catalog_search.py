"""An upstream dataset YAML with no `catalog:` key: `--catalog` / `--shards` flags, or the catalog/*.yaml
search (pipelines/mixture/config.py find_catalog), and all problems of a mixture reported at once
(pipelines/mixture/sources.py check_mixture)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from jobs import plan as plan_job
from pipelines.mixture.config import MixtureConfig, MixtureConfigError, find_catalog
from pipelines.mixture.sources import check_mixture, resolve_sources
from tests.helpers.shard_factory import make_catalog, tiny, write_config

# An upstream UniMedVL dataset YAML as written for the upstream trainer: no catalog:, shards: or train: key.
UPSTREAM = """SftJSONLIterableDataset_Ver1:
  dataset_names: [vqa]
  weight: 2
  is_mandatory: true
SftJSONLIterableDataset_TextOnly:
  dataset_names: [txt]
  weight: 1
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project (pyproject.toml) whose catalog/ folder holds one catalog with shards, and an upstream YAML
    kept elsewhere, unchanged."""
    root = tmp_path_factory.mktemp("proj")
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    catalog = make_catalog(root / "catalog", [tiny("vqa", "sft", 16), tiny("txt", "text_only", 12)])
    upstream = write_config(tmp_path_factory.mktemp("upstream") / "dataset_config.yaml", UPSTREAM)
    return root, catalog, upstream


def test_flags_run_an_unchanged_upstream_yaml(project, capsys, tmp_path, monkeypatch):
    root, catalog, upstream = project
    monkeypatch.chdir(tmp_path)          # no catalog/ here: only the flags can name it
    moved = tmp_path / "elsewhere"
    shutil.copytree(catalog.parent / "shards", moved)
    assert plan_job.main([str(upstream), "--catalog", str(catalog), "--shards", str(moved), "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"catalog {catalog} (--catalog); shards {moved}"


def test_without_key_or_flag_the_catalog_folder_is_searched(project, capsys, monkeypatch):
    root, catalog, upstream = project
    monkeypatch.chdir(root)
    assert plan_job.main([str(upstream), "--steps", "3", "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["catalog"] == str(catalog)
    assert report["catalog_from"] == f"found by dataset names in {root / 'catalog'}/*.yaml"


def test_two_catalogs_holding_the_names_is_ambiguous_and_lists_them(project, tmp_path, monkeypatch, capsys):
    root, catalog, upstream = project
    proj = tmp_path / "p"
    shutil.copytree(root, proj)
    shutil.copy(proj / "catalog" / "catalog.yaml", proj / "catalog" / "copy.yaml")
    monkeypatch.chdir(proj)
    assert plan_job.main([str(upstream)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "several catalogs" in err[0] and "--catalog" in err[0]
    assert str(proj / "catalog" / "catalog.yaml") in err[0] and str(proj / "catalog" / "copy.yaml") in err[0]


def test_a_missing_name_lists_the_catalogs_searched_with_close_matches(project, monkeypatch, capsys, tmp_path):
    root, catalog, _ = project
    typo = write_config(tmp_path / "typo.yaml", UPSTREAM.replace("[vqa]", "[vqaa]"))
    monkeypatch.chdir(root)
    assert plan_job.main([str(typo)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "'vqaa' is in none of the catalogs searched" in err[0] and str(catalog) in err[0]
    assert "Close matches: vqa." in err[0]


def test_problems_of_every_dataset_come_at_once(tmp_path):
    catalog = make_catalog(tmp_path, [tiny("vqa", "sft", 16), tiny("txt", "text_only", 12), tiny("t2i", "t2i", 8)])
    shutil.rmtree(tmp_path / "shards" / "t2i")                     # never ingested
    cfg = MixtureConfig.from_yaml(write_config(tmp_path / "m.yaml", f"""catalog: {catalog}
sft: {{dataset_names: [vqq]}}
text_only: {{dataset_names: [vqa]}}
t2i: {{dataset_names: [t2i]}}
"""))
    problems = check_mixture(cfg)
    assert len(problems) == 3
    assert "names dataset 'vqq', which is not in the catalog" in problems[0] and "Close matches: vqa" in problems[0]
    assert "dataset 'vqa' is a" in problems[1] and "lists it under text_only" in problems[1]
    assert "no shards for dataset 't2i'" in problems[2] and "--only t2i" in problems[2]
    with pytest.raises(MixtureConfigError) as info:
        resolve_sources(cfg)
    assert info.value.problems == problems


def test_a_truncated_shard_is_named_with_the_ingest_to_rerun(tmp_path):
    catalog = make_catalog(tmp_path, [tiny("vqa", "sft", 16)])
    part = sorted((tmp_path / "shards" / "vqa").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    cfg = MixtureConfig.from_yaml(write_config(tmp_path / "m.yaml", f"catalog: {catalog}\nsft: {{dataset_names: [vqa]}}\n"))
    (problem,) = check_mixture(cfg)
    assert problem.startswith(f"{part}: shard file is unreadable (")
    assert problem.endswith(f"re-run the ingest with --force --only vqa (python jobs/ingest.py {catalog} --force "
                            f"--only vqa)")


NAMES = st.sampled_from(["a", "b", "c", "d"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(catalogs=st.lists(st.sets(NAMES, max_size=4), min_size=0, max_size=3),
       wanted=st.lists(NAMES, min_size=1, max_size=3, unique=True))
def test_search_picks_the_only_catalog_holding_every_name(tmp_path_factory, catalogs, wanted):
    """Whatever names the catalogs hold: the search returns the one catalog whose names include all wanted
    ones, and otherwise raises (never picks a catalog that lacks a name, never guesses between two)."""
    root = tmp_path_factory.mktemp("search")
    (root / "pyproject.toml").write_text("")
    (root / "catalog").mkdir()
    files = []
    for i, names in enumerate(catalogs):
        path = root / "catalog" / f"c{i}.yaml"
        path.write_text(yaml.safe_dump({"datasets": [{"name": n, "task": "sft"} for n in sorted(names)]}))
        files.append(path.resolve())
    cfg = MixtureConfig.from_dict({"sft": {"dataset_names": wanted}}, root / "mix.yaml")
    holding = [f for f, names in zip(files, catalogs) if set(wanted) <= names]
    if len(holding) == 1:
        assert find_catalog(cfg) == holding[0]
    else:
        with pytest.raises(MixtureConfigError) as info:
            find_catalog(cfg)
        text = str(info.value)
        assert ("several catalogs" in text) == (len(holding) > 1)
        if not holding and any(not any(n in c for c in catalogs) for n in wanted):
            assert "none of the catalogs searched" in text


def test_catalog_key_wins_over_the_search_and_flags_win_over_the_key(project, tmp_path):
    root, catalog, upstream = project
    cfg = MixtureConfig.from_yaml(write_config(tmp_path / "k.yaml", f"catalog: {catalog}\n" + UPSTREAM))
    assert cfg.with_locations().catalog == catalog and cfg.with_locations().catalog_from == "catalog: key"
    other = tmp_path / "other.yaml"
    flagged = cfg.with_locations(catalog=other, shards="s", base=tmp_path)
    assert (flagged.catalog, flagged.shards, flagged.catalog_from) == (other, tmp_path / "s", "--catalog")


def test_a_missing_shards_folder_is_one_line_next_to_the_other_problems(tmp_path):
    catalog = make_catalog(tmp_path, [tiny("vqa", "sft", 16), tiny("txt", "text_only", 12)])
    cfg = MixtureConfig.from_yaml(write_config(tmp_path / "m.yaml", UPSTREAM.replace("[txt]", "[txtt]")))
    problems = check_mixture(cfg.with_locations(catalog=catalog, shards=tmp_path / "nowhere"))
    assert len(problems) == 2
    assert problems[0] == (f"{tmp_path / 'm.yaml'}: no shards yet: the shards folder {tmp_path / 'nowhere'} does not "
                           f"exist. Run: python jobs/ingest.py {catalog} --only vqa --out {tmp_path / 'nowhere'} (or "
                           f"name the folder the ingest wrote with --shards or a shards: key)")
    assert "names dataset 'txtt', which is not in the catalog" in problems[1]


def test_stream_names_the_catalog_it_found_on_stderr(project, monkeypatch, capsys):
    from jobs import stream as stream_job

    root, catalog, upstream = project
    monkeypatch.chdir(root)
    assert stream_job.main([str(upstream), "--take", "1", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == f"catalog {catalog} (found by dataset names in {root / 'catalog'}/*.yaml)"
    assert captured.out.count("\n") == 1 and '"samples"' in captured.out      # stdout stays one JSON line per pack
