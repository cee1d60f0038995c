"""Evaluation of unified medical VLMs: scoring rules (closed / open VQA, reports, images), the evaluation run
behind jobs/evaluate.py and its HTML report (docs/evaluation.md)."""
