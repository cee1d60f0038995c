"""The README's recipe for public VQA sets distributed as Hugging Face datasets (VQA-RAD style columns
question / answer / answer_type / image): catalog `hf` source -> ingest -> evaluation records, whose
answer_type column decides closed vs open; then scoring a predictions file over them."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

datasets = pytest.importorskip("datasets")

from datasets_catalog.catalog import load_catalog  # noqa: E402
from jobs.evaluate import main  # noqa: E402
from model.evaluation.runner import text_row  # noqa: E402
from model.evaluation.sources import from_catalog  # noqa: E402
from pipelines.ingest.driver import run_ingest  # noqa: E402

ROWS = [("Is there a pneumothorax?", "yes", "CLOSED"), ("Which lung is affected?", "Left lung", "OPEN"),
        ("Is the heart enlarged?", "No", "closed"), ("Is this a CT?", "yes", "OPEN")]


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def test_vqa_rad_style_hf_dataset_evaluates_from_the_catalog(tmp_path, capsys):
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "answer_type": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": _png((i * 40, 90, 30)), "path": f"img{i}.png"}
                                               for i in range(len(ROWS))],
                                     "question": [r[0] for r in ROWS], "answer": [r[1] for r in ROWS],
                                     "answer_type": [r[2] for r in ROWS]}, features=features)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "vqa_rad"))
    (tmp_path / "catalog.yaml").write_text(f"""output_dir: shards
tokenizer: builtin
datasets:
  - name: vqa_rad
    task: sft
    source: hf
    hf: {{path: {tmp_path / 'vqa_rad'}, split: test, question: question, answer: answer, input_images: [image]}}
    modality: radiology
    split: test
""")
    report = run_ingest(load_catalog(tmp_path / "catalog.yaml"), executor="local", progress=False, log=lambda s: None)
    assert report.ok
    items = list(from_catalog(tmp_path / "catalog.yaml", ["vqa_rad"]))
    assert [(it.question, it.reference) for it in items] == [(q, a) for q, a, _ in ROWS]
    assert all(it.error is None and len(it.images) == 1 and it.images[0].load().size == (40, 32) for it in items)
    rows = [text_row(it, pred) for it, pred in zip(items, ["Yes.", "the left lung", "yes", "yes"])]
    # the answer_type column (kept in the record's extra) decides: CLOSED/closed -> closed, OPEN -> open
    assert [r["answer_type"] for r in rows] == ["closed", "open", "closed", "open"]
    assert [r["correct"] for r in rows] == [True, True, False, True]
    assert rows[0]["modality"] == "radiology"

    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({k: r[k] for k in ("sample_id", "dataset", "question", "reference",
                                                            "prediction", "answer_type")}) + "\n" for r in rows))
    assert main(["--predictions", str(preds), "--out", str(tmp_path / "eval")]) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())["datasets"]["vqa_rad"]
    assert m["closed"] == {"n": 2, "accuracy": 0.5}
    assert m["open"] == {"n": 2, "recall": 1.0, "exact_match": 0.5}
