"""Hugging Face datasets in and out: an HF dataset with an Image feature (built here with `datasets`) ingests
into shards equal in content to the same records given as JSONL; our shards load with
`datasets.load_dataset("parquet")` with rows equal to pandas'; DuckDB reads them in place.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
datasets = pytest.importorskip("datasets")

from datasets_catalog.catalog import load_catalog  # noqa: E402
from pipelines.ingest import hf_source  # noqa: E402
from datasets_catalog.hf_mapping import HFSourceConfig, HFSourceError, parse_hf_mapping  # noqa: E402
from pipelines.ingest.hf_source import materialize  # noqa: E402
from pipelines.ingest.driver import run_ingest  # noqa: E402


def _png(w: int, h: int, color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((w, h)).convert("RGB").save(buf, "JPEG", quality=85)
    return buf.getvalue()


CT, MR = _png(96, 64, (40, 40, 40)), _jpeg(120, 80)
BAD = b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8
# (image name, image bytes, question, answer, answer_type): one VQA-RAD-like row each
ROWS = [
    ("ct_chest.png", CT, "Is there a pleural effusion?", "no", "CLOSED"),
    ("mr_brain.jpg", MR, "Which lobe shows the lesion?", "left temporal", "OPEN"),
    ("ct_chest.png", CT, "What plane is this?", "axial", "OPEN"),      # same image, another question
    ("broken.png", BAD, "Is this readable?", "no", "CLOSED"),           # -> image_corrupt, like JSONL
    ("mr_brain.jpg", MR, "Is there contrast?", None, "CLOSED"),         # -> field_missing (no answer), like JSONL
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The same five rows three ways: an HF save_to_disk folder (Image feature), HF Parquet, and JSONL +
    image folder written by hand (the reference)."""
    root = tmp_path_factory.mktemp("hf")
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "answer_type": datasets.Value("string"),
                                  "qid": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({
        "image": [{"bytes": data, "path": name} for name, data, *_ in ROWS],
        "question": [r[2] for r in ROWS], "answer": [r[3] for r in ROWS], "answer_type": [r[4] for r in ROWS],
        "qid": list(range(1, len(ROWS) + 1))}, features=features)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(root / "vqa_hf"))
    (root / "vqa_parquet" / "data").mkdir(parents=True)
    ds.to_parquet(str(root / "vqa_parquet" / "data" / "train-00000-of-00001.parquet"))
    images = root / "jsonl" / "images"
    images.mkdir(parents=True)
    lines = []
    for qid, (name, data, question, answer, answer_type) in enumerate(ROWS, start=1):
        (images / name).write_bytes(data)
        message = [{"from": "human", "value": f"<image>\n{question}"}]
        if answer is not None:
            message.append({"from": "gpt", "value": answer})
        lines.append(json.dumps({"input_img": [{"path": name}], "message": message, "answer_type": answer_type,
                                 "qid": qid}))
    (root / "jsonl" / "vqa.jsonl").write_text("\n".join(lines) + "\n")
    return {"root": root, "hf": root / "vqa_hf", "parquet": root / "vqa_parquet", "jsonl": root / "jsonl"}


def _mapping(path: Path, cache: Path, **extra) -> HFSourceConfig:
    raw = {"path": str(path), "question": "question", "answer": "answer", "input_images": ["image"], **extra}
    return parse_hf_mapping(raw, path.parent, cache, "sft", True)


def test_mapping_errors_are_actionable(sources, tmp_path):
    with pytest.raises(HFSourceError, match="hf.path not found"):
        parse_hf_mapping({"path": "nope", "question": "q"}, tmp_path, tmp_path / "c", "sft", True)
    with pytest.raises(HFSourceError, match="list the image column"):
        parse_hf_mapping({"path": str(sources["hf"]), "question": "q"}, tmp_path, tmp_path / "c", "sft", True)
    with pytest.raises(HFSourceError, match="unknown key 'questoin'"):
        parse_hf_mapping({"path": str(sources["hf"]), "questoin": "q"}, tmp_path, tmp_path / "c", "sft", True)
    with pytest.raises(HFSourceError, match="has splits train, test, not 'validation'"):
        materialize(_mapping(sources["hf"], tmp_path / "c", split="validation"), "umv", "sft")
    with pytest.raises(HFSourceError, match="column 'image_col', which .* does not have"):
        materialize(_mapping(sources["hf"], tmp_path / "c", input_images="image_col"), "umv", "sft")
    with pytest.raises(HFSourceError, match="hf.template uses {modality}"):
        materialize(_mapping(sources["hf"], tmp_path / "c", template="{modality}: {question}"), "umv", "sft")


def test_parquet_arrow_and_save_to_disk_give_the_same_records(sources, tmp_path):
    a = materialize(_mapping(sources["hf"], tmp_path / "a"), "umv", "sft")
    b = materialize(_mapping(sources["parquet"], tmp_path / "b", split="train"), "umv", "sft")
    assert a.rebuilt and b.rebuilt and a.rows == b.rows == len(ROWS)
    assert a.jsonl_path.read_text() == b.jsonl_path.read_text()
    arrow = next((sources["hf"] / "train").glob("*.arrow"))          # a bare Arrow file (features in its schema)
    c = materialize(_mapping(arrow, tmp_path / "c"), "umv", "sft")
    assert c.jsonl_path.read_text() == a.jsonl_path.read_text()
    assert sorted(p.name for p in a.data_dir.iterdir()) == ["broken.png", "ct_chest.png", "mr_brain.jpg"]
    again = materialize(_mapping(sources["hf"], tmp_path / "a"), "umv", "sft")
    assert not again.rebuilt and again.jsonl_path.stat().st_mtime_ns == a.jsonl_path.stat().st_mtime_ns


def _catalog(root: Path, hf: Path, jsonl: Path) -> Path:
    text = f"""
tokenizer: builtin
max_reject_fraction: 0.5
datasets:
  - name: vqa_from_hf
    task: sft
    source: hf
    hf: {{path: {hf}, question: question, answer: answer, input_images: [image], cache_dir: hf_cache}}
  - {{name: vqa_from_jsonl, task: sft, jsonl_path: {jsonl / 'vqa.jsonl'}, data_dir: {jsonl / 'images'}}}
"""
    path = root / "catalog.yaml"
    path.write_text(text)
    return path


def test_catalog_hf_entries_are_checked(sources, tmp_path):
    from datasets_catalog.catalog import CatalogError, parse_catalog

    good = f"datasets:\n  - {{name: v, task: sft, source: hf, hf: {{path: {sources['hf']}, question: q, " \
           f"input_images: image}}}}\n"
    spec = parse_catalog(good, tmp_path / "c.yaml").datasets["v"]
    assert spec.extra_options["hf_source"]["path"] == str(sources["hf"])
    assert spec.jsonl_path.name == "records.jsonl" and spec.data_dir.name == "images"
    with pytest.raises(CatalogError, match=r"line 2: dataset 'v', field 'jsonl_path': a 'source: hf' dataset"):
        parse_catalog(good.replace("source: hf,", "source: hf, jsonl_path: x.jsonl,"), tmp_path / "c.yaml")
    with pytest.raises(CatalogError, match=r"field 'hf': hf.question is missing"):
        parse_catalog(good.replace("question: q, ", ""), tmp_path / "c.yaml")
    with pytest.raises(CatalogError, match=r"field 'source': must be 'jsonl'"):
        parse_catalog(good.replace("source: hf", "source: hub"), tmp_path / "c.yaml")


@pytest.fixture(scope="module")
def ingested(sources, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ingest")
    catalog = load_catalog(_catalog(work, sources["hf"], sources["jsonl"]))
    report = run_ingest(catalog, out=work / "shards", executor="local", progress=False, log=lambda s: None)
    assert report.ok and [d.status for d in report.datasets] == ["built", "built"], report
    again = run_ingest(catalog, out=work / "shards", executor="local", progress=False, log=lambda s: None)
    assert [d.status for d in again.datasets] == ["up to date", "up to date"]   # cache reused, no rebuild
    return work / "shards"


def _comparable(folder: Path) -> pd.DataFrame:
    df = pd.read_parquet(folder).drop(columns=["sample_id", "dataset"])
    return df.sort_values("line_number").reset_index(drop=True)


def test_hf_dataset_ingests_like_the_same_records_as_jsonl(ingested):
    hf, js = _comparable(ingested / "vqa_from_hf"), _comparable(ingested / "vqa_from_jsonl")
    assert len(hf) == 3                                           # two of five rows rejected
    pd.testing.assert_frame_equal(hf, js)                          # messages, image bytes, sizes, tokens, extra
    assert json.loads(hf.loc[0, "extra"]) == {"answer_type": "CLOSED", "qid": 1}
    assert hf.loc[0, "input_images"][0]["bytes"] == CT and hf.loc[1, "input_images"][0]["format"] == "JPEG"
    rej_hf = pd.read_parquet(ingested / "vqa_from_hf" / "_rejects.parquet")
    rej_js = pd.read_parquet(ingested / "vqa_from_jsonl" / "_rejects.parquet")
    assert list(zip(rej_hf.line_number, rej_hf.reason)) == list(zip(rej_js.line_number, rej_js.reason)) == [
        (4, "image_corrupt"), (5, "field_missing")]


def _plain(value):
    """pandas cells (numpy arrays of dicts) -> plain Python, to compare with `datasets` rows."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def test_shards_load_with_datasets_and_rows_match_pandas(ingested, tmp_path):
    folder = ingested / "vqa_from_hf"
    ds = datasets.load_dataset("parquet", data_dir=str(folder), data_files="part-*.parquet", split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert ds.features["num_tokens"] == datasets.Value("int64")
    assert ds.features["input_images"].feature["bytes"] == datasets.Value("binary")
    assert ds.features["messages"].feature["from"] == datasets.Value("string")
    df = pd.read_parquet(sorted(folder.glob("part-*.parquet")))
    assert ds.num_rows == len(df) == 3
    for i, row in enumerate(ds):
        assert row == {k: _plain(v) for k, v in df.iloc[i].to_dict().items()}


def test_duckdb_queries_shards_in_place(ingested):
    duckdb = pytest.importorskip("duckdb")
    got = duckdb.sql(f"""
        SELECT m.modality, s.dataset, count(*) AS rows, avg(s.num_tokens) AS mean_tokens
        FROM read_parquet('{ingested}/*/part-*.parquet') s
        JOIN read_json_auto('{ingested}/*/_manifest.json') m USING (dataset)
        GROUP BY ALL ORDER BY dataset""").fetchall()
    df = pd.read_parquet([p for p in ingested.glob("*/part-*.parquet")])
    want = df.groupby("dataset").num_tokens.agg(["count", "mean"])
    assert [(d, n, pytest.approx(m)) for _, d, n, m in got] == [
        (d, int(r["count"]), pytest.approx(r["mean"])) for d, r in want.iterrows()]


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="{}<>"), min_size=1,
                max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(task=st.sampled_from(["sft", "vlm_sft", "t2i", "edit"]), question=_text, answer=_text,
       n_images=st.integers(min_value=1, max_value=3))
def test_mapped_rows_are_valid_records_of_their_task(tmp_path_factory, task, question, answer, n_images):
    """Whatever the text, a row with its images and an answer maps onto a record the JSONL validator accepts
    for the task kind, with the question and answer as the turns and one tag per input image (none for t2i)."""
    from datasets_catalog.records import parse_record
    from datasets_catalog.task_kinds import resolve_task_kind

    kind = resolve_task_kind(task)
    images = tmp_path_factory.mktemp("img")
    row = {"q": question, "a": answer, "img": [{"bytes": CT, "path": f"i{k}.png"} for k in range(n_images)],
           "target": {"bytes": MR, "path": "target.jpg"}, "note": 7}
    n_in = {"t2i": 0, "edit": 1}.get(task, n_images)
    cfg = HFSourceConfig(path=str(images), question="q", answer=None if task == "t2i" else "a",
                                   input_images=("img",) if n_in else (),
                                   output_images=("target",) if task in ("t2i", "edit") else ())
    if task == "edit":
        row["img"] = row["img"][:1]
    template = hf_source.default_template(task)
    record = hf_source.row_to_record(row, cfg, kind.record_style, kind.name,
                                     hf_source._ImageWriter(images, images), template, frozenset())
    parsed = parse_record(json.loads(json.dumps(record)), kind)     # through JSON, as the ingest reads it
    assert len(parsed.input_images) == n_in and parsed.messages[0].value.endswith(question)
    assert parsed.messages[0].value.count("<image>") == n_in
    if cfg.answer:
        assert parsed.messages[1].value == answer
    assert record.get("note") == 7                                   # unmapped columns travel as extras


def test_bagel_style_parquet_with_a_binary_image_column(tmp_path):
    """BAGEL's t2i Parquet files hold encoded image bytes in a plain binary column (what
    jobs/import_legacy.py tells users to bring through `source: hf`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "t2i").mkdir()
    pq.write_table(pa.table({"image": pa.array([CT, MR], pa.binary()),
                             "caption": ["An axial CT slice.", "A brain MR."]}), tmp_path / "t2i" / "part0.parquet")
    cfg = parse_hf_mapping({"path": str(tmp_path / "t2i"), "question": "caption", "output_images": ["image"]},
                           tmp_path, tmp_path / "cache", "t2i", True)
    done = materialize(cfg, "umv", "t2i")
    records = [json.loads(line) for line in done.jsonl_path.read_text().splitlines()]
    assert [r["message"][0]["value"] for r in records] == ["An axial CT slice.", "A brain MR."]
    written = [(done.data_dir / r["output_img"][0]["path"]).read_bytes() for r in records]
    assert written == [CT, MR]
