"""trainer.metrics: the MFU FLOP count against upstream's formula; a log window's summary."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from trainer.metrics import Window, dense_params_for_flops, peak_tflops_from_name, step_flops, summarise


def test_mfu_formula_matches_upstream_count():
    llm = SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=10, head_dim=4)
    # L·(3·H·I + H·(q + k + v + o)) + 2·V·H with q = o = 8, k = v = 4
    assert dense_params_for_flops(llm) == 2 * (3 * 8 * 16 + 8 * (8 + 4 + 4 + 8)) + 2 * 10 * 8
    assert step_flops(llm, 5, 25) == 6 * dense_params_for_flops(llm) * 5 + 12 * 4 * 2 * 2 * 25
    assert peak_tflops_from_name("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops_from_name("cpu") == 0.0


def test_window_summary_shares_and_wait():
    w = Window(groups=["a", "b"])
    b = SimpleNamespace(sequence_length=100, sample_lens=[60, 40], batch_data_indexes=[{}, {}],
                        metrics={"packing_efficiency": 0.5, "tokens_per_group": {"a": 75, "b": 25},
                                 "samples_per_group": {"a": 1, "b": 1}})
    w.add_batch(b)
    w.steps, w.step_time, w.data_wait, w.ce_sum, w.ce_denom = 1, 2.0, 0.1, 6.0, 3.0
    rec = summarise(w.reduce(), world=1, step=1, lr=1e-3, lrs={}, wall=2.0, device=torch.device("cpu"))
    assert rec["ce"] == 2.0 and rec["share_tokens/a"] == 0.75 and rec["data_wait_fraction"] == pytest.approx(0.05)
    assert rec["tokens_per_sec"] == 50.0 and rec["packing_efficiency"] == 0.5 and "mfu" not in rec
