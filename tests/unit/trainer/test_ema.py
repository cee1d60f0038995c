"""trainer.ema: one EMA step checked by hand; frozen tensors are never updated."""
from __future__ import annotations

import torch
from torch import nn

from trainer.ema import ema_update, make_ema


def test_ema_matches_formula_on_a_hand_checked_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[1].weight.requires_grad_(False)              # a frozen tensor is never updated
    ema = make_ema(model)
    assert all(not p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        model[1].weight.copy_(torch.tensor([[9.0, 9.0]]))
        ema[0].weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [10.0, 10.0, 10.0]]))
    before_frozen = ema[1].weight.clone()
    n = ema_update(ema, model, decay=0.9)
    # 0.9 * ema + 0.1 * model, by hand
    expected = torch.tensor([[0.1, 0.2, 0.3], [9.4, 9.5, 9.6]])
    assert torch.allclose(ema[0].weight, expected, atol=1e-6)
    assert torch.equal(ema[1].weight, before_frozen)
    assert n == 3  # weight + bias of layer 0, bias of layer 1
