"""trainer.optim: parameter groups per component, as upstream (UMV) builds them."""
from __future__ import annotations

from torch import nn

from trainer.optim import build_optimizer, component_of


class _Comp(nn.Module):
    def __init__(self):
        super().__init__()
        self.language_model = nn.Linear(2, 2)
        self.vit_model = nn.Linear(2, 2)
        self.vae_model = nn.Linear(2, 2)
        self.connector = nn.Linear(2, 2)


def test_optimizer_groups_as_umv():
    m = _Comp()
    m.vae_model.requires_grad_(False)
    opt = build_optimizer(m, lr=1e-4, llm_lr=2e-5, vit_lr=None)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"vit_model", "language_model", "others"}   # frozen VAE left out
    assert groups["language_model"]["lr"] == 2e-5 and groups["vit_model"]["lr"] == 1e-4
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-15 and g["weight_decay"] == 0.0 for g in opt.param_groups)
    assert component_of("module.vit_model.x.weight") == "vit_model" and component_of("vae2llm.weight") == "others"
