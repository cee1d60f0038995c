"""Scoring rules against hand-computed cases (docs/evaluation.md#scoring-rules), and their invariants."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from model.evaluation.scoring import (aggregate, answer_type_of, bleu4, closed_correct, exact_match, normalize,
                                      open_recall, parse_prediction_line, PredictionError, rouge_l, score_text)


@pytest.mark.parametrize("text, tokens", [
    ("Chest X-ray!", ["chest", "x", "ray"]),
    ("  YES.  ", ["yes"]),
    ("left_lung,right-lung", ["left", "lung", "right", "lung"]),
    ("T2-weighted MRI (axial)", ["t2", "weighted", "mri", "axial"]),
    ("", []),
    (None, []),
    ("Ödem im Thorax", ["ödem", "im", "thorax"]),
])
def test_normalize(text, tokens):
    assert normalize(text) == tokens


@pytest.mark.parametrize("reference, extra, kind", [
    ("Yes.", None, "closed"),
    ("no", {}, "closed"),
    ("left", {"answer_type": "closed"}, "closed"),        # declared, any case
    ("yes", {"answer_type": "OPEN"}, "open"),             # a declared type wins over the yes/no rule
    ("x-ray", None, "open"),
    ("yes there is", None, "open"),
    (" ".join(["word"] * 20), None, "open"),              # 20 tokens: still open
    (" ".join(["word"] * 21), None, "report"),            # more than 20 tokens: a report
])
def test_answer_type(reference, extra, kind):
    assert answer_type_of(reference, extra) == kind


def test_report_dataset_makes_short_answers_reports():
    assert answer_type_of("No acute findings.", None, report_dataset=True) == "report"
    assert answer_type_of("no", None, report_dataset=True) == "closed"


@pytest.mark.parametrize("reference, prediction, correct", [
    ("yes", "Yes, there is a fracture.", True),
    ("Yes", "yes", True),
    ("no", "No.", True),
    ("yes", "no", False),
    ("yes", "Yes and no", True),               # the first yes/no token decides
    ("no", "yes, or rather no", False),
    ("yes", "", False),                        # empty prediction: no yes/no token -> wrong
    ("yes", None, False),
    ("no", "there is no effusion", True),      # "no" as a word counts
    ("no", "nodule present", False),           # "nodule" is not "no"
    ("yes", "yes_sir", True),                  # underscore splits
    ("left", "Left.", True),                   # declared CLOSED non-yes/no answer: whole answer
    ("left", "left side", False),
])
def test_closed(reference, prediction, correct):
    assert closed_correct(reference, prediction) is correct


@pytest.mark.parametrize("reference, prediction, recall, exact", [
    ("x-ray", "chest x-ray", 1.0, False),          # ref {x, ray} all found
    ("chest x-ray", "x-ray", 2 / 3, False),        # ref {chest, x, ray}: 2 of 3
    ("Chest X-Ray.", "chest x ray", 1.0, True),    # case and punctuation do not matter
    ("left left lung", "left lung", 2 / 3, False), # multiset: the second "left" is not matched
    ("left lung", "lung lung left", 1.0, False),
    ("pneumothorax", "", 0.0, False),
    ("pneumothorax", "pneumonia", 0.0, False),
])
def test_open(reference, prediction, recall, exact):
    assert open_recall(reference, prediction) == pytest.approx(recall)
    assert exact_match(reference, prediction) is exact


def test_report_scores_hand_computed():
    assert bleu4("the heart is normal in size", "The heart is normal in size.") == pytest.approx(1.0)
    assert bleu4("the heart is normal", "") == 0.0
    # ROUGE-L: LCS of "a b c d" and "a c d" is 3 -> P 3/3, R 3/4, F = 2PR/(P+R) = 6/7
    assert rouge_l("a b c d", "a c d") == pytest.approx(6 / 7)
    assert rouge_l("a b c d", "e f") == 0.0
    # BLEU-4 of a prediction sharing no 4-gram is far below a perfect match
    assert bleu4("the heart is normal in size", "size in normal is heart the") < 0.5


def test_aggregate_means_per_dataset_modality_and_type():
    rows = [
        {"dataset": "a", "modality": "ct", "answer_type": "closed", "scores": {"accuracy": 1.0}},
        {"dataset": "a", "modality": "ct", "answer_type": "closed", "scores": {"accuracy": 0.0}},
        {"dataset": "a", "modality": "mr", "answer_type": "open", "scores": {"recall": 0.5, "exact_match": 0.0}},
        {"dataset": "b", "modality": "mr", "answer_type": "open", "scores": {"recall": 1.0, "exact_match": 1.0}},
        {"dataset": "b", "modality": "mr", "error": "image missing"},
    ]
    m = aggregate(rows)
    assert m["datasets"]["a"]["n"] == 3 and m["datasets"]["a"]["closed"] == {"n": 2, "accuracy": 0.5}
    assert m["datasets"]["b"]["errors"] == 1 and m["datasets"]["b"]["open"]["recall"] == 1.0
    assert m["modalities"]["mr"]["open"] == {"n": 2, "recall": 0.75, "exact_match": 0.5}
    assert m["answer_types"]["closed"]["accuracy"] == 0.5
    assert m["overall"]["n"] == 5 and m["overall"]["errors"] == 1


def test_prediction_lines_name_line_and_field():
    with pytest.raises(PredictionError, match=r"p.jsonl:3: field 'prediction' is missing"):
        parse_prediction_line('{"dataset": "a", "reference": "yes"}', "p.jsonl:3")
    with pytest.raises(PredictionError, match=r"p.jsonl:1: not valid JSON"):
        parse_prediction_line('{"dataset": ', "p.jsonl:1")
    with pytest.raises(PredictionError, match=r"field 'answer_type'"):
        parse_prediction_line('{"dataset": "a", "reference": "y", "prediction": "y", "answer_type": "maybe"}', "p:1")
    assert parse_prediction_line('{"dataset": "a", "reference": "No", "prediction": "n"}', "p:1")["answer_type"] == "closed"


WORDS = st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6), max_size=25)
SEPARATORS = st.sampled_from([" ", ", ", " - ", "! ", "_", "...", "\n", "/"])


def _decorate(words: list[str], seps: list[str], upper: bool) -> str:
    out = "".join(w + seps[i % len(seps)] for i, w in enumerate(words))
    return out.upper() if upper else out


@settings(max_examples=60, deadline=None)
@given(ref=WORDS, pred=WORDS, seps=st.lists(SEPARATORS, min_size=1, max_size=4), upper=st.booleans())
def test_scores_are_in_unit_interval_and_ignore_case_and_punctuation(ref, pred, seps, upper):
    plain_ref, plain_pred = " ".join(ref), " ".join(pred)
    fancy_ref, fancy_pred = _decorate(ref, seps, upper), _decorate(pred, seps[::-1], not upper)
    for kind in ("closed", "open", "report"):
        plain = score_text(kind, plain_ref, plain_pred)
        fancy = score_text(kind, fancy_ref, fancy_pred)
        assert plain == pytest.approx(fancy)
        assert all(0.0 <= v <= 1.0 for v in plain.values())
