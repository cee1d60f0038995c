"""Attention backends on random packed layouts: SDPA, split-gather varlen and flex agree with a naive
masked-softmax reference built from the upstream two-pass mask (property-based)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.attention import PackedAttention, TokenLayout, choose_backend, repeat_kv
from tests.unit.model.test_model_batches import reference_sample_mask, single_thread  # noqa: F401

MODES = st.sampled_from(["causal", "full", "noise"])
SAMPLE = st.lists(st.tuples(st.integers(1, 5), MODES), min_size=1, max_size=4)


def naive(q, k, v, samples):
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    outs, start = [], 0
    for splits in samples:
        lens = [n for n, _ in splits]
        S = sum(lens)
        mask = reference_sample_mask(lens, [m for _, m in splits])
        qs, ks, vs = (t[start:start + S].transpose(0, 1) for t in (q, k, v))
        scores = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
        start += S
    return torch.cat(outs)


@settings(max_examples=20, deadline=None)
@given(samples=st.lists(SAMPLE, min_size=1, max_size=3), seed=st.integers(0, 2**16))
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_backends_match_naive_reference(samples, seed):
    lens = [n for s in samples for n, _ in s]
    modes = [m for s in samples for _, m in s]
    sample_lens = [sum(n for n, _ in s) for s in samples]
    L = sum(lens)
    layout = TokenLayout.build(L, sample_lens, lens, modes)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(L, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(L, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(L, 2, 8, generator=g, dtype=torch.float64)
    ref = naive(q, k, v, samples)
    for backend in ("sdpa", "varlen"):
        got = PackedAttention(layout, backend)(q, k, v)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    got = PackedAttention(layout, "flex")(q.float(), k.float(), v.float())
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_sdpa_and_varlen_gradients_agree():
    samples = [[(3, "causal"), (4, "full"), (2, "causal"), (5, "noise"), (2, "causal")], [(4, "noise"), (3, "causal")]]
    lens = [n for s in samples for n, _ in s]
    layout = TokenLayout.build(sum(lens), [sum(n for n, _ in s) for s in samples], lens,
                               [m for s in samples for _, m in s])
    grads = []
    for backend in ("sdpa", "varlen"):
        torch.manual_seed(0)
        q = torch.randn(sum(lens), 4, 8, requires_grad=True)
        k = torch.randn(sum(lens), 2, 8, requires_grad=True)
        v = torch.randn(sum(lens), 2, 8, requires_grad=True)
        (PackedAttention(layout, backend)(q, k, v) ** 2).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_automatic_backend_choice():
    assert choose_backend("auto", torch.device("cpu")) == "sdpa"
    assert choose_backend("flex", torch.device("cpu")) == "flex"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="flash-attn"):
            choose_backend("flash", torch.device("cpu"))


def test_rope_tables_keep_fp32_frequencies_after_a_bf16_cast():
    """model.to(bf16) (GPU inference) casts the inv_freq buffer; the angles must still come from fp32 frequencies."""
    from model.qwen2 import Qwen2RotaryEmbedding

    rope = Qwen2RotaryEmbedding(64, 1e6)
    pos = torch.arange(0, 512)
    cos32, sin32 = rope(pos, torch.bfloat16)
    rope.to(torch.bfloat16)
    assert rope.inv_freq.dtype == torch.bfloat16
    cos16, sin16 = rope(pos, torch.bfloat16)
    assert torch.equal(cos32, cos16) and torch.equal(sin32, sin16)
