"""trainer.schedule: constant and cosine warm-up factors, per-group learning rates, state round trip."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trainer.schedule import WarmupScheduler, lr_factor


def test_constant_with_warmup():
    f = [lr_factor(s, kind="constant", warmup_steps=4, total_steps=10) for s in range(7)]
    assert f == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_reaches_min_lr():
    kw = dict(kind="cosine", warmup_steps=2, total_steps=12, min_lr_rate=0.01)
    assert lr_factor(2, **kw) == pytest.approx(1.0)
    assert lr_factor(7, **kw) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(12, **kw) == pytest.approx(0.01)
    assert lr_factor(50, **kw) == pytest.approx(0.01)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 50), st.integers(0, 50), st.integers(0, 120))
def test_cosine_bounded_and_monotone_after_warmup(warm, extra, step):
    total = warm + extra
    kw = dict(kind="cosine", warmup_steps=warm, total_steps=total, min_lr_rate=0.1)
    f, g = lr_factor(step, **kw), lr_factor(step + 1, **kw)
    assert 0.0 <= f <= 1.0
    if step >= warm:
        assert g <= f + 1e-12 and f >= 0.1 - 1e-12


def test_scheduler_per_group_and_state_roundtrip():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.5}])
    sch = WarmupScheduler(opt, kind="cosine", warmup_steps=2, total_steps=10, lr=1.0, min_lr=0.1)
    for _ in range(5):
        sch.step()
    assert sch.get_last_lr()[1] == pytest.approx(0.5 * sch.get_last_lr()[0])
    opt2 = torch.optim.AdamW([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.5}])
    sch2 = WarmupScheduler(opt2, kind="cosine", warmup_steps=2, total_steps=10, lr=1.0, min_lr=0.1)
    sch2.load_state_dict(sch.state_dict())
    assert sch2.get_last_lr() == sch.get_last_lr()
