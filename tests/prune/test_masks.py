"""Masks as weight transforms: the straight-through gradient dL/dS = dL/dW' * W (by the hand
formula on a Linear), the scores after k SGD steps, magnitude top-k, soft movement's threshold and
regulariser, global scope, the 0.5% floor, the step counter and checkpoints."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch as st
from slimtorch.cost import weight_mask
from slimtorch.prune import min_kept, soft_penalty


def _lin(seed=0, i=6, o=5):
    torch.manual_seed(seed)
    return nn.Linear(i, o)


def _hand_grad_wprime(x, g):
    """dL/dW' for L = sum(g * (x W'^T + b)) on a Linear: g^T x."""
    return g.t() @ x


@pytest.mark.parametrize("cfg", [st.HardMovement(remaining=0.5, total_steps=10),
                                 st.SoftMovement(total_steps=10, initial_tau=0.05, tau=0.1)])
def test_score_gradient_is_grad_wprime_times_w(cfg):
    m = _lin()
    st.prune_(m, cfg)
    mk = weight_mask(m)
    mk.value.fill_(0.5)                                   # kept fraction / tau on sigmoid(S)
    with torch.no_grad():
        mk.scores.copy_(torch.randn_like(mk.scores))      # a non-trivial mask
    x, g = torch.randn(7, 6), torch.randn(7, 5)
    (g * m(x)).sum().backward()
    W = m.parametrizations.weight.original
    M = mk.mask_for(W).to(W.dtype)
    assert 0 < M.sum() < M.numel()
    dwp = _hand_grad_wprime(x, g)
    torch.testing.assert_close(mk.scores.grad, dwp * W.detach())          # dL/dS = dL/dW' * W
    torch.testing.assert_close(W.grad, dwp * M)                            # dL/dW = dL/dW' * M
    torch.testing.assert_close(m.weight, W * M)


def test_scores_after_k_sgd_steps_are_accumulated_movement():
    """S_k = -eta * sum_t (dL/dW'_t) * W_t with plain SGD (scores start at 0), weights training too."""
    m = _lin(1)
    eta, k = 0.05, 6
    st.prune_(m, st.HardMovement(remaining=0.5, total_steps=k, scores_lr=eta))
    opt = torch.optim.SGD(st.prune_param_groups(m, lr=0.1), lr=0.1)
    assert opt.param_groups[-1]["lr"] == eta
    mk = weight_mask(m)
    expected = torch.zeros_like(mk.scores)
    for t in range(k):
        x, g = torch.randn(4, 6), torch.randn(4, 5)
        W_t = m.parametrizations.weight.original.detach().clone()
        expected -= eta * _hand_grad_wprime(x, g) * W_t
        (g * m(x)).sum().backward()
        opt.step(); opt.zero_grad(); st.step(m)
    torch.testing.assert_close(mk.scores.detach(), expected)
    assert int(mk.step) == k and float(mk.value) == 0.5


def test_magnitude_keeps_the_largest_weights_and_freezes_the_rest():
    m = _lin(2, 10, 10)
    st.prune_(m, st.Magnitude(remaining=0.3))                 # one shot
    W = m.parametrizations.weight.original
    M = weight_mask(m).mask_for(W)
    assert int(M.sum()) == 30
    assert W.detach().abs()[M].min() >= W.detach().abs()[~M].max()
    m(torch.randn(3, 10)).sum().backward()
    assert (W.grad[~M] == 0).all() and (W.grad[M] != 0).any()


def test_soft_movement_mask_and_penalty():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    cfg = st.SoftMovement(total_steps=10, tau=0.1, lam=400.0)
    st.prune_(model, cfg)
    assert float(st.penalty(model).detach()) == 0.0           # tau_0 = 0: lambda_0 = 0
    masks = [weight_mask(model[0]), weight_mask(model[2])]
    for mk in masks:
        mk.value.fill_(0.05)                                  # tau_t
        with torch.no_grad():
            mk.scores.copy_(torch.randn_like(mk.scores) * 3)
    want = 400.0 * 0.05 / 0.1 * sum(torch.sigmoid(mk.scores).sum() / mk.scores.numel() for mk in masks) / 2
    assert float(soft_penalty(model).detach()) == pytest.approx(float(want), rel=1e-6)
    assert float(st.penalty(model).detach()) == pytest.approx(float(want), rel=1e-6)
    W = model[0].parametrizations.weight.original
    assert torch.equal(masks[0].mask_for(W), torch.sigmoid(masks[0].scores) > 0.05)
    st.penalty(model).backward()
    assert (masks[0].scores.grad > 0).all()       # L1 on sigmoid(S): descent pushes every score down


@pytest.mark.parametrize("cfg", [st.Magnitude(remaining=1e-4), st.HardMovement(remaining=1e-4, total_steps=1),
                                 st.SoftMovement(total_steps=1, tau=0.9)])
def test_at_least_half_a_percent_kept_per_layer(cfg):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 7), nn.Conv2d(3, 4, 3))
    st.prune_(model, cfg)
    for mk in st.prune.masks_of(model):
        if hasattr(mk, "scores"):
            with torch.no_grad():
                mk.scores.copy_(torch.randn_like(mk.scores) - 20)   # sigmoid(S) ~ 0: nothing above tau
    st.step(model)
    for name, m, mk in st.pruned_layers(model):
        M = mk.mask_for(m.parametrizations.weight.original)
        assert int(M.sum()) >= max(1, math.ceil(0.005 * M.numel())), name
        assert int(M.sum()) == min_kept(M.numel())
    assert min_kept(10000) == 51 and min_kept(700) == 4 and min_kept(1) == 1


def test_global_scope_one_threshold_recomputed_every_k_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 20))
    cfg = st.HardMovement(remaining=0.25, total_steps=10, scope="global", global_every=4)
    st.prune_(model, cfg)
    a, b = weight_mask(model[0]), weight_mask(model[1])
    with torch.no_grad():
        a.scores.copy_(torch.randn(20, 20) + 1.0)                  # layer 0 more important overall
        b.scores.copy_(torch.randn(20, 20) - 1.0)
    thresholds = []
    for t in range(10):
        st.step(model)
        thresholds.append(float(a.threshold))
        assert float(a.threshold) == float(b.threshold)
    assert thresholds[3] != thresholds[2] and thresholds[4] == thresholds[3]   # recomputed at step 4, held
    masks = st.prune.layer_masks(model)
    kept = sum(int(x.sum()) for x in masks.values())
    assert abs(kept - 0.25 * 800) <= 1                         # recomputed at the last step: on target
    assert int(masks["0"].sum()) > int(masks["1"].sum())       # not the same fraction per layer


def test_step_counter_checkpoint_roundtrip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5))
    cfg = st.HardMovement(remaining=0.2, total_steps=8, warmup_steps=1)
    st.prune_(model, cfg)
    for _ in range(5):
        st.step(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(k.endswith("scores") for k in sd) and any(k.endswith(".step") for k in sd)
    fresh = nn.Sequential(nn.Linear(5, 5))
    st.prune_(fresh, cfg)
    fresh.load_state_dict(sd)
    x = torch.randn(2, 5)
    assert torch.equal(fresh(x), model(x))
    assert int(weight_mask(fresh[0]).step) == 5


def test_apply_masks_materialises_w_times_m():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    st.prune_(model, st.Magnitude(remaining=0.25))
    x = torch.randn(4, 8)
    before = model(x)
    kept = st.apply_masks_(model)
    assert kept == {"0": 16, "2": 4}
    assert not list(st.pruned_layers(model)) and not hasattr(model[0], "parametrizations")
    torch.testing.assert_close(model(x), before)
    assert int((model[0].weight != 0).sum()) == 16


def test_param_groups_on_top_of_quantizer_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    st.prune_(model, st.HardMovement(remaining=0.5, total_steps=4, scores_lr=0.3))
    groups = st.prune_param_groups(model, lr=1e-3, base=[{"params": list(model.parameters()), "lr": 1e-3}])
    ids = [[id(p) for p in g["params"]] for g in groups]
    scores = weight_mask(model[0]).scores
    assert ids[-1] == [id(scores)] and groups[-1]["lr"] == 0.3 and groups[-1]["weight_decay"] == 0.0
    assert id(scores) not in ids[0] and len(ids[0]) == 2
