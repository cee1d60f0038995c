"""Dataset manifests, task kinds, record validation and the shared per-sample rules.

Everything here is pure Python: ingest (Ray Data), the training stream and inference all call it,
so the resize rule, the tokenizer wrapper and the sequence plan exist exactly once.
"""
