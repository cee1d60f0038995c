"""jobs/evaluate.py without a model: --predictions gives the hand-computed metrics, --compare prints deltas,
bad input is one `error:` line with exit status 2, and report.html is self-contained."""
from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from jobs.evaluate import main

LINES = [
    {"dataset": "vqa_rad", "reference": "Yes", "prediction": "yes, it is", "answer_type": "CLOSED", "sample_id": "r1"},
    {"dataset": "vqa_rad", "reference": "no", "prediction": "Yes.", "question": "Is there a fracture?"},
    {"dataset": "vqa_rad", "reference": "chest x-ray", "prediction": "x-ray"},
    {"dataset": "vqa_rad", "reference": "Left lung", "prediction": "left lung"},
    {"dataset": "slake", "reference": "no", "prediction": ""},
    {"dataset": "slake", "reference": "brain", "prediction": "the brain"},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_predictions_file_gives_the_hand_computed_metrics(tmp_path, capsys):
    src = _write(tmp_path / "p.jsonl", LINES)
    assert main(["--predictions", str(src), "--out", str(tmp_path / "out")]) == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    rad, slake = m["datasets"]["vqa_rad"], m["datasets"]["slake"]
    assert rad["n"] == 4 and rad["closed"] == {"n": 2, "accuracy": 0.5}
    assert rad["open"]["n"] == 2
    assert rad["open"]["recall"] == pytest.approx((2 / 3 + 1) / 2)
    assert rad["open"]["exact_match"] == pytest.approx(0.5)
    assert slake["closed"] == {"n": 1, "accuracy": 0.0}
    assert slake["open"] == {"n": 1, "recall": 1.0, "exact_match": 0.0}
    preds = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [p["answer_type"] for p in preds] == ["closed", "closed", "open", "open", "closed", "open"]
    assert preds[0]["sample_id"] == "r1" and preds[1]["correct"] is False
    out = capsys.readouterr().out
    assert "vqa_rad" in out and "accuracy 0.500" in out


def test_compare_prints_per_dataset_deltas(tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", LINES)
    b = _write(tmp_path / "b.jsonl", [{**r, "prediction": r["reference"]} for r in LINES])
    assert main(["--predictions", str(a), "--out", str(tmp_path / "A")]) == 0
    assert main(["--predictions", str(b), "--out", str(tmp_path / "B")]) == 0
    capsys.readouterr()
    assert main(["--compare", str(tmp_path / "A" / "metrics.json"), str(tmp_path / "B" / "metrics.json"),
                 "--json"]) == 0
    rows = {(r["dataset"], r["metric"]): r for r in json.loads(capsys.readouterr().out)}
    assert rows[("vqa_rad", "closed/accuracy")]["delta"] == "+0.5000"
    assert rows[("slake", "closed/accuracy")]["delta"] == "+1.0000"
    assert rows[("vqa_rad", "open/recall")]["delta"] == f"{1 - 5 / 6:+.4f}"


@pytest.mark.parametrize("content, message", [
    ('{"dataset": "a", "reference": "yes", "prediction": "yes"}\n{"dataset": "a", "reference": "yes"}\n',
     "p.jsonl:2: field 'prediction' is missing"),
    ('not json\n', "p.jsonl:1: not valid JSON"),
    ('{"dataset": "a", "reference": 3, "prediction": "3"}\n', "p.jsonl:1: field 'reference' must be a string"),
])
def test_bad_prediction_lines_are_one_error_line(tmp_path, capsys, content, message):
    (tmp_path / "p.jsonl").write_text(content)
    assert main(["--predictions", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_usage_mistakes_exit_2(tmp_path, capsys):
    assert main(["--predictions", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert main(["--model_path", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert main(["--compare", str(tmp_path / "x.json"), str(tmp_path / "y.json")]) == 2
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 3 and all(e.startswith("error: ") for e in errs)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.links = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src", ""))
        if tag in ("script", "link") or (tag == "a" and a.get("href", "").startswith("http")):
            self.links.append(tag)


def test_report_html_embeds_every_image(tmp_path):
    from model.evaluation.html_report import render

    rows = [{"sample_id": "a:1", "dataset": "a", "answer_type": "closed", "question": "Is it <b>?", "reference": "yes",
             "prediction": "no", "scores": {"accuracy": 0.0}, "correct": False},
            {"sample_id": "a:2", "dataset": "a", "answer_type": "open", "reference": "lung", "prediction": "lung",
             "scores": {"recall": 1.0, "exact_match": 1.0}, "correct": True}]
    metrics = {"model_path": "ck", "datasets": {"a": {"n": 2, "closed": {"n": 1, "accuracy": 0.0}}},
               "modalities": {"ct": {"n": 2, "closed": {"n": 1, "accuracy": 0.0}}}, "answer_types": {}}
    page = render(metrics, rows, lambda row: [Image.new("RGB", (32, 24), (200, 10, 10))])
    parser = _Images()
    parser.feed(page)
    assert len(parser.srcs) == 2 and parser.links == []
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size == (32, 24)
    assert page.index("a:1") < page.index("a:2")          # worst first
    assert "Is it &lt;b&gt;?" in page                       # escaped


def test_bad_records_become_error_lines_and_a_torn_run_resumes(tmp_path, capsys):
    from tests.unit.model.inference.test_batched_text import _ckpt

    ck = _ckpt(tmp_path / "ck")
    good = {"input_img": [{"path": "ct/ct_small_bone.png"}],
            "message": [{"from": "human", "value": "<image>\nIs this a CT?"}, {"from": "gpt", "value": "yes"}]}
    lines = [json.dumps(good),
             json.dumps({**good, "input_img": [{"path": "ct/missing.png"}]}),
             "{not json",
             json.dumps({"message": [{"from": "human", "value": "What is a bone window?"}]}),   # no answer
             json.dumps({"message": [{"from": "human", "value": "What is a bone window?"},
                                     {"from": "gpt", "value": "A wide window for bone."}]})]
    src = tmp_path / "recs.jsonl"
    src.write_text("\n".join(lines) + "\n")
    images = Path(__file__).resolve().parents[3] / "examples" / "radiology" / "images"
    args = ["--model_path", str(ck), "--input", str(src), "--data_dir", str(images), "--out", str(tmp_path / "o"),
            "--max_new_tokens", "4", "--batch_size", "2", "--vit_transform", "56,28,14,3136", "--quiet"]
    assert main(args) == 0
    out = tmp_path / "o" / "predictions.jsonl"
    rows = {r["sample_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == [f"recs:{i}" for i in range(1, 6)]
    assert "missing.png" in rows["recs:2"]["error"] and "recs.jsonl:3" in rows["recs:3"]["error"]
    assert "no gpt answer" in rows["recs:4"]["error"]
    assert rows["recs:1"]["answer_type"] == "closed" and rows["recs:5"]["answer_type"] == "open"
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["datasets"]["recs"]["n"] == 5 and m["datasets"]["recs"]["errors"] == 3

    # a run killed mid-line: the torn record is redone, the others are kept
    text = out.read_text().splitlines()
    out.write_text("\n".join(text[:-1]) + "\n" + text[-1][: len(text[-1]) // 2])
    capsys.readouterr()
    assert main(args) == 0
    assert "1 records evaluated (0 errors), 4 already in" in capsys.readouterr().out
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["sample_id"] for r in again) == sorted(rows)
