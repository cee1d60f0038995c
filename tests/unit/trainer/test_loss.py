"""trainer.loss: CE as a global per-token mean over ranks, CE re-weighting, MSE over channels."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from trainer.loss import Denominators, compute_loss


def _batch(n_ce, weights=None):
    return SimpleNamespace(ce_loss_indexes=torch.arange(n_ce), num_ce_tokens=n_ce, num_mse_tokens=0,
                           ce_loss_weights=None if weights is None else torch.tensor(weights))


def test_ce_is_a_global_per_token_mean():
    # two ranks: rank 0 has 2 tokens, rank 1 has 6; DDP averages gradients over W = 2
    ce0, ce1 = torch.tensor([1.0, 3.0], requires_grad=True), torch.full((6,), 2.0, requires_grad=True)
    den = Denominators(ce=8.0, mse=0.0)
    kw = dict(ce_weight=1.0, mse_weight=1.0, reweighting=False, visual_gen=False, world=2)
    l0 = compute_loss(ce0, None, _batch(2), den, **kw).loss
    l1 = compute_loss(ce1, None, _batch(6), den, **kw).loss
    assert ((l0 + l1) / 2).item() == pytest.approx((1 + 3 + 6 * 2) / 8)
    l0.backward()
    assert torch.allclose(ce0.grad / 2, torch.full((2,), 1 / 8))   # every token weighs 1 / Σ_all N


def test_ce_reweighting_and_weights():
    ce = torch.tensor([1.0, 2.0, 4.0])
    b = _batch(3, weights=[1.0, 0.5, 0.5])
    parts = compute_loss(ce, None, b, Denominators(ce=2.0, mse=0.0), ce_weight=0.25, mse_weight=1.0,
                         reweighting=True, visual_gen=False, world=1)
    assert parts.loss.item() == pytest.approx(0.25 * (1 + 1 + 2) / 2.0)


def test_mse_mean_over_channels_and_off_without_visual_gen():
    mse = torch.ones(4, 64) * 3.0
    b = SimpleNamespace(ce_loss_indexes=None, num_ce_tokens=0, num_mse_tokens=4, ce_loss_weights=None)
    on = compute_loss(None, mse, b, Denominators(ce=0, mse=4.0), ce_weight=1, mse_weight=2.0, reweighting=False,
                      visual_gen=True, world=1)
    off = compute_loss(None, mse, b, Denominators(ce=0, mse=4.0), ce_weight=1, mse_weight=2.0, reweighting=False,
                       visual_gen=False, world=1)
    assert on.loss.item() == pytest.approx(6.0) and off.loss.item() == 0.0
