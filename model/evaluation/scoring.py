"""Text scoring rules of medical VQA (docs/evaluation.md#scoring-rules): normalisation, the closed / open /
report split, per-record scores and their means per dataset, modality and answer type.

Pure functions over strings so they can be tested against hand-computed cases; BLEU-4 and ROUGE-L come from
`sacrebleu` and `rouge-score` (offline libraries, no metric scripts fetched at run time).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

REPORT_MIN_TOKENS = 21          # a reference of more than 20 tokens is a report
KINDS = ("closed", "open", "report", "image")


def normalize(text: str | None) -> list[str]:
    """Lower-case, every character that is not a letter, digit or whitespace (underscore included) -> space,
    split on whitespace. Letters and digits are Unicode-aware (`str.isalnum`)."""
    if not text:
        return []
    lowered = text.lower()
    return "".join(c if (c.isalnum() or c.isspace()) and c != "_" else " " for c in lowered).split()


def answer_type_of(reference: str | None, extra: dict | None = None, report_dataset: bool = False) -> str:
    """'closed', 'open' or 'report' for a text record.

    closed: `extra["answer_type"]` is CLOSED (any case), or, without an answer_type, the normalised reference
    is exactly `yes` or `no`; report: the dataset is a report dataset, or the reference has more than 20
    tokens; otherwise open."""
    declared = (extra or {}).get("answer_type")
    tokens = normalize(reference)
    if isinstance(declared, str) and declared.strip():
        if declared.strip().upper() == "CLOSED":
            return "closed"
    elif tokens in (["yes"], ["no"]):
        return "closed"
    if report_dataset or len(tokens) >= REPORT_MIN_TOKENS:
        return "report"
    return "open"


def closed_correct(reference: str, prediction: str | None) -> bool:
    """The first `yes`/`no` token of the prediction equals the reference's (no such token: wrong). A closed
    reference without yes/no (a declared CLOSED choice question) is compared on its first token instead."""
    ref = normalize(reference)
    pred = normalize(prediction)
    ref_answer = next((t for t in ref if t in ("yes", "no")), None)
    if ref_answer is None:  # a declared CLOSED question with another answer ("left", "ct"): the whole answer
        return bool(ref) and pred == ref
    pred_answer = next((t for t in pred if t in ("yes", "no")), None)
    return pred_answer == ref_answer


def open_recall(reference: str, prediction: str | None) -> float:
    """|multiset(ref) ∩ multiset(pred)| / |ref| (LLaVA-Med's open-question recall); an empty reference is 0."""
    ref, pred = Counter(normalize(reference)), Counter(normalize(prediction))
    total = sum(ref.values())
    return sum((ref & pred).values()) / total if total else 0.0


def exact_match(reference: str, prediction: str | None) -> bool:
    return normalize(reference) == normalize(prediction)


def bleu4(reference: str, prediction: str | None) -> float:
    """Sentence BLEU-4 in [0, 1] over the normalised tokens (sacrebleu, exponential smoothing, no re-tokenising)."""
    from sacrebleu.metrics import BLEU

    ref, pred = " ".join(normalize(reference)), " ".join(normalize(prediction))
    if not ref or not pred:
        return 0.0
    metric = BLEU(tokenize="none", effective_order=True)
    score = float(metric.sentence_score(pred, [ref]).score) / 100.0
    return min(1.0, max(0.0, score))   # sacrebleu's percentage can exceed 100 by a rounding error


def rouge_l(reference: str, prediction: str | None) -> float:
    """ROUGE-L F-measure in [0, 1] over the normalised tokens (rouge-score)."""
    from rouge_score import rouge_scorer

    ref, pred = " ".join(normalize(reference)), " ".join(normalize(prediction))
    if not ref or not pred:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WhitespaceTokenizer())
    return min(1.0, float(scorer.score(ref, pred)["rougeL"].fmeasure))


class _WhitespaceTokenizer:
    """rouge-score's tokenizer interface over our normalisation (its default drops non-ASCII letters)."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


def score_text(kind: str, reference: str, prediction: str | None) -> dict[str, float]:
    """Per-record scores of one kind: closed {accuracy}, open {recall, exact_match}, report {bleu4, rouge_l}."""
    if kind == "closed":
        return {"accuracy": float(closed_correct(reference, prediction))}
    if kind == "open":
        return {"recall": open_recall(reference, prediction), "exact_match": float(exact_match(reference, prediction))}
    if kind == "report":
        return {"bleu4": bleu4(reference, prediction), "rouge_l": rouge_l(reference, prediction)}
    raise ValueError(f"unknown text kind {kind!r}")


def is_correct(kind: str, scores: dict[str, float]) -> bool | None:
    """The card verdict of the HTML report: closed accuracy, open recall 1.0; None for reports and images."""
    if kind == "closed":
        return scores.get("accuracy") == 1.0
    if kind == "open":
        return scores.get("recall") == 1.0
    return None


@dataclass
class Aggregate:
    """Sums of per-record scores of one kind, for means."""

    n: int = 0
    sums: dict[str, float] | None = None

    def add(self, scores: dict[str, float]) -> None:
        self.n += 1
        self.sums = self.sums or {}
        for k, v in scores.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def means(self) -> dict[str, Any]:
        return {"n": self.n, **{k: v / self.n for k, v in (self.sums or {}).items()}}


def aggregate(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """{"datasets": {name: {"n", kind: {...}}}, "modalities": {...}, "answer_types": {...}, "overall": {...}} from
    scored prediction rows (rows with an "error" are counted under "errors", not scored)."""
    groups: dict[str, dict[str, dict[str, Aggregate]]] = {"datasets": {}, "modalities": {}, "overall": {}}
    answer_types: dict[str, Aggregate] = {}
    counts: dict[str, dict[str, dict[str, int]]] = {"datasets": {}, "modalities": {}, "overall": {}}
    for row in rows:
        keys = {"datasets": str(row.get("dataset") or "?"), "modalities": str(row.get("modality") or "unknown"),
                "overall": "all"}
        for g, key in keys.items():
            c = counts[g].setdefault(key, {"n": 0, "errors": 0})
            c["n"] += 1
            if row.get("error"):
                c["errors"] += 1
        if row.get("error") or not row.get("scores"):
            continue
        kind = row.get("answer_type")
        if kind not in KINDS:
            continue
        for g, key in keys.items():
            groups[g].setdefault(key, {}).setdefault(kind, Aggregate()).add(row["scores"])
        answer_types.setdefault(kind, Aggregate()).add(row["scores"])
    out: dict[str, Any] = {}
    for g in ("datasets", "modalities", "overall"):
        out[g] = {key: {**c, **{kind: a.means() for kind, a in sorted(groups[g].get(key, {}).items())}}
                  for key, c in sorted(counts[g].items())}
    out["overall"] = out["overall"].get("all", {"n": 0, "errors": 0})
    out["answer_types"] = {k: a.means() for k, a in sorted(answer_types.items())}
    return out


def score_row(row: dict[str, Any]) -> dict[str, Any]:
    """Add "scores" to a text prediction row (answer_type already set); image rows are scored elsewhere."""
    if row.get("error") or row.get("answer_type") not in ("closed", "open", "report"):
        return row
    return {**row, "scores": score_text(row["answer_type"], row.get("reference") or "", row.get("prediction"))}


class PredictionError(ValueError):
    """A bad line of a predictions file: names the file, line and field."""


def parse_prediction_line(raw: str, where: str) -> dict[str, Any]:
    """One line of a predictions file: needs `dataset`, `reference`, `prediction` (strings); `answer_type`
    (closed/open/report, any case), `sample_id`, `question`, `modality` optional."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PredictionError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); fix or delete the line")
    if not isinstance(obj, dict):
        raise PredictionError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if obj.get("error"):
        return obj
    for field in ("dataset", "reference", "prediction"):
        if field not in obj:
            raise PredictionError(f"{where}: field '{field}' is missing (a line needs dataset, reference, prediction)")
        if not isinstance(obj[field], str):
            raise PredictionError(f"{where}: field '{field}' must be a string, got {type(obj[field]).__name__}")
    declared = obj.get("answer_type")
    if declared is not None:
        if not isinstance(declared, str) or declared.strip().lower() not in ("closed", "open", "report", "image"):
            raise PredictionError(f"{where}: field 'answer_type' is {declared!r}; use closed, open or report")
        obj["answer_type"] = declared.strip().lower()
    else:
        obj["answer_type"] = answer_type_of(obj["reference"])
    return obj
