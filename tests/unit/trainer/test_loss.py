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


# -- denominators, by hand ------------------------------------------------------------------------------------
def _mb(n_ce, n_mse, weights=None):
    return SimpleNamespace(ce_loss_indexes=torch.arange(n_ce) if n_ce else None, num_ce_tokens=n_ce,
                           num_mse_tokens=n_mse, ce_loss_weights=None if weights is None else torch.tensor(weights))


def test_ce_denominator_with_and_without_reweighting():
    from trainer.loss import global_denominators, local_ce_denominator
    b = _mb(3, 0, [1.0, 0.5, 0.25])
    assert local_ce_denominator(b, reweighting=False) == 3.0
    assert local_ce_denominator(b, reweighting=True) == 1.75          # Σ w = 1 + 0.5 + 0.25
    assert local_ce_denominator(_mb(0, 4), reweighting=True) == 0.0    # no CE tokens: nothing, not an error
    with pytest.raises(ValueError, match="no ce_loss_weights"):
        local_ce_denominator(_mb(2, 0), reweighting=True)
    window = [b, _mb(2, 5, [2.0, 2.0]), _mb(0, 7)]
    assert global_denominators(window, reweighting=False) == Denominators(ce=5.0, mse=12.0)
    assert global_denominators(window, reweighting=True) == Denominators(ce=5.75, mse=12.0)


def test_reweighted_ce_divides_by_the_sum_of_weights_not_the_token_count():
    ce = torch.tensor([2.0, 2.0, 2.0, 2.0])
    b = _mb(4, 0, [1.0, 1.0, 0.5, 0.5])
    den = Denominators(ce=3.0, mse=0.0)                                # Σ w
    on = compute_loss(ce, None, b, den, ce_weight=1.0, mse_weight=1.0, reweighting=True, visual_gen=False, world=1)
    off = compute_loss(ce, None, b, Denominators(ce=4.0, mse=0.0), ce_weight=1.0, mse_weight=1.0,
                       reweighting=False, visual_gen=False, world=1)
    assert on.loss.item() == pytest.approx((2 + 2 + 1 + 1) / 3)        # a weighted mean of equal values: 2.0
    assert on.ce_sum == pytest.approx(6.0)
    assert off.loss.item() == pytest.approx(2.0) and off.ce_sum == pytest.approx(8.0)


def test_mse_divides_by_the_global_count_and_scales_with_the_world():
    mse = torch.tensor([[1.0, 3.0], [5.0, 7.0]])                       # per-token means over channels: 2, 6
    b = _mb(0, 2)
    parts = compute_loss(None, mse, b, Denominators(ce=0.0, mse=8.0), ce_weight=1.0, mse_weight=0.5,
                         reweighting=False, visual_gen=True, world=4)
    assert parts.loss.item() == pytest.approx(0.5 * 4 * (2 + 6) / 8)
    assert parts.mse_sum == pytest.approx(8.0)


@pytest.mark.parametrize("reweighting", [False, True])
def test_two_micro_batches_give_the_gradient_of_one_combined_batch(reweighting):
    """Gradient accumulation: micro-batches of 2 and 6 CE tokens (1 and 3 MSE tokens), each loss computed with
    the window's denominators, summed by backward(), equal the per-token-mean gradient of all 8 (4) tokens at
    once. The expectation is written directly from the rule (Σ w·ce / Σ w + λ·Σ mean_c mse / N), in float64;
    the per-micro-step mean BAGEL used would differ."""
    from trainer.loss import global_denominators

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(8, generator=gen, dtype=torch.float64)
    z = torch.randn(4, 5, 3, generator=gen, dtype=torch.float64)
    w = torch.tensor([1.0, 0.5, 0.25, 1.0, 2.0, 1.0, 0.5, 1.5], dtype=torch.float64)
    theta0 = torch.tensor([0.3, -0.2, 0.7], dtype=torch.float64)
    split_ce, split_mse = (slice(0, 2), slice(2, 8)), (slice(0, 1), slice(1, 4))

    def ce_of(theta, s):
        return (x[s] @ theta - y[s]) ** 2

    def mse_of(theta, s):
        return (z[s] @ theta - 0.1) ** 2

    theta = theta0.clone().requires_grad_(True)
    batches = [_mb(2, 1, w[0:2].tolist()), _mb(6, 3, w[2:8].tolist())]
    den = global_denominators(batches, reweighting)
    for b, sc, sm in zip(batches, split_ce, split_mse):
        compute_loss(ce_of(theta, sc), mse_of(theta, sm), b, den, ce_weight=1.0, mse_weight=0.5,
                     reweighting=reweighting, visual_gen=True, world=1).loss.backward()

    ref = theta0.clone().requires_grad_(True)
    ce_all, mse_all = ce_of(ref, slice(0, 8)), mse_of(ref, slice(0, 4)).mean(dim=-1)
    ce_term = (w * ce_all).sum() / w.sum() if reweighting else ce_all.mean()
    (ce_term + 0.5 * mse_all.mean()).backward()
    assert torch.allclose(theta.grad, ref.grad, rtol=1e-5, atol=1e-9)

    bagel = theta0.clone().requires_grad_(True)                       # mean of per-micro-step means
    for sc, sm in zip(split_ce, split_mse):
        ce_b, mse_b = ce_of(bagel, sc), mse_of(bagel, sm).mean(dim=-1)
        ((ce_b.mean() + 0.5 * mse_b.mean()) / 2).backward()
    assert not torch.allclose(bagel.grad, ref.grad, rtol=1e-3)


# -- edges: one token, zero denominators, nothing to learn, ranks ---------------------------------------------
def test_denominator_edges():
    from trainer.loss import global_denominators, local_ce_denominator
    assert local_ce_denominator(_mb(1, 0), reweighting=False) == 1.0              # a single CE token counts
    assert local_ce_denominator(_mb(1, 0, [0.5]), reweighting=True) == 0.5
    no_index = SimpleNamespace(ce_loss_indexes=None, num_ce_tokens=3, num_mse_tokens=0, ce_loss_weights=None)
    assert local_ce_denominator(no_index, reweighting=False) == 0.0               # no loss indexes: no CE
    with pytest.raises(ValueError, match=r"^ce_loss_reweighting is on but the batch has no ce_loss_weights$"):
        local_ce_denominator(_mb(2, 0), reweighting=True)
    # counts beyond float32's 2^24 stay exact (the all-reduce runs in float64)
    assert global_denominators([_mb(0, 16_777_217)], reweighting=False).mse == 16_777_217.0


def test_single_tokens_and_small_denominators_are_not_skipped():
    kw = dict(ce_weight=1.0, mse_weight=1.0, visual_gen=True, world=1)
    one_ce = compute_loss(torch.tensor([3.0]), None, _mb(1, 0, [0.75]), Denominators(ce=0.75, mse=0.0),
                          reweighting=True, **kw)
    assert one_ce.loss.item() == pytest.approx(3.0 * 0.75 / 0.75) and one_ce.ce_sum == pytest.approx(2.25)
    one_mse = compute_loss(None, torch.tensor([[4.0]]), _mb(0, 1), Denominators(ce=0.0, mse=1.0),
                           reweighting=False, **kw)
    assert one_mse.loss.item() == pytest.approx(4.0) and one_mse.mse_sum == pytest.approx(4.0)


def test_loss_is_float32_whatever_the_weights_dtype():
    b = SimpleNamespace(ce_loss_indexes=torch.arange(2), num_ce_tokens=2, num_mse_tokens=0,
                        ce_loss_weights=torch.tensor([1.0, 0.5], dtype=torch.float64))
    parts = compute_loss(torch.tensor([1.0, 2.0]), None, b, Denominators(ce=1.5, mse=0.0), ce_weight=1.0,
                         mse_weight=1.0, reweighting=True, visual_gen=False, world=1)
    assert parts.loss.dtype == torch.float32 and parts.loss.item() == pytest.approx(2.0 / 1.5)


def test_zero_denominators_never_divide():
    # all CE weights zero (Σ w = 0) and an MSE denominator of 0: both terms count as 0, not NaN
    ce = torch.tensor([1.0, 2.0], requires_grad=True)
    parts = compute_loss(ce, torch.ones(2, 3), _mb(2, 2, [0.0, 0.0]), Denominators(ce=0.0, mse=0.0),
                         ce_weight=1.0, mse_weight=1.0, reweighting=True, visual_gen=True, world=1)
    assert parts.loss.item() == 0.0 and parts.ce_sum == 0.0 and parts.mse_sum == pytest.approx(2.0)


def test_nothing_to_learn_still_joins_the_graph():
    # CE present but no CE anywhere in the window (denominator 0): a zero loss wired to ce, so backward reaches it
    ce = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    parts = compute_loss(ce, None, _mb(3, 0), Denominators(ce=0.0, mse=0.0), ce_weight=1.0, mse_weight=1.0,
                         reweighting=False, visual_gen=False, world=1)
    assert parts.loss.item() == 0.0 and (parts.ce_sum, parts.mse_sum) == (0.0, 0.0)
    parts.loss.backward()
    assert ce.grad is not None and torch.equal(ce.grad, torch.zeros(3))
    # neither CE nor MSE: a zero scalar that backward accepts
    empty = compute_loss(None, None, _mb(0, 0), Denominators(ce=0.0, mse=0.0), ce_weight=1.0, mse_weight=1.0,
                         reweighting=False, visual_gen=True, world=1)
    assert empty.loss.shape == () and empty.loss.item() == 0.0 and empty.loss.requires_grad
    assert (empty.ce_sum, empty.mse_sum) == (0.0, 0.0)
    empty.loss.backward()


def test_mse_only_micro_batch_when_other_ranks_have_ce():
    # this rank has no CE tokens (ce None) while the window's CE denominator is 5 (other ranks)
    parts = compute_loss(None, torch.full((2, 4), 3.0), _mb(0, 2), Denominators(ce=5.0, mse=4.0), ce_weight=1.0,
                         mse_weight=1.0, reweighting=False, visual_gen=True, world=1)
    assert parts.loss.item() == pytest.approx(2 * 3.0 / 4.0) and parts.ce_sum == 0.0


def test_world_defaults_to_the_process_group(monkeypatch):
    import trainer.loss as loss_mod

    ce = torch.tensor([2.0, 4.0])
    kw = dict(ce_weight=1.0, mse_weight=1.0, reweighting=False, visual_gen=False)
    alone = compute_loss(ce, None, _mb(2, 0), Denominators(ce=2.0, mse=0.0), **kw)     # no process group: W = 1
    assert alone.loss.item() == pytest.approx(3.0)
    monkeypatch.setattr(loss_mod.dist, "is_available", lambda: True)
    monkeypatch.setattr(loss_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(loss_mod.dist, "get_world_size", lambda: 3)
    assert loss_mod.world_size() == 3
    assert compute_loss(ce, None, _mb(2, 0), Denominators(ce=2.0, mse=0.0), **kw).loss.item() == pytest.approx(9.0)


def test_denominators_are_summed_over_ranks(monkeypatch):
    """With 2 ranks the window's counts go through one SUM all-reduce (here a stand-in for the other rank that
    contributes the same counts), so every rank divides by the global total."""
    import trainer.loss as loss_mod

    calls = []

    def fake_all_reduce(t, op=None):
        calls.append(op)
        t.mul_(2)

    monkeypatch.setattr(loss_mod, "world_size", lambda: 2)
    monkeypatch.setattr(loss_mod.dist, "all_reduce", fake_all_reduce)
    den = loss_mod.global_denominators([_mb(3, 5, [1.0, 1.0, 0.5])], reweighting=True)
    assert den == Denominators(ce=5.0, mse=10.0) and calls == [loss_mod.dist.ReduceOp.SUM]


def test_an_empty_mse_without_ce_still_joins_the_graph():
    mse = torch.zeros(0, 4, requires_grad=True)
    parts = compute_loss(None, mse, _mb(0, 0), Denominators(ce=0.0, mse=0.0), ce_weight=1.0, mse_weight=1.0,
                         reweighting=False, visual_gen=True, world=1)
    assert parts.loss.item() == 0.0
    parts.loss.backward()
    assert mse.grad is not None and mse.grad.shape == (0, 4)
