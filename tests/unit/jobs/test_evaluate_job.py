"""jobs/evaluate.py without a model: --predictions gives the hand-computed metrics, --compare prints deltas,
bad input is one `error:` line with exit status 2, and report.html is self-contained."""
from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

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
