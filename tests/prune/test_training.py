"""A pruned model trains a few steps on random data in a plain loop and ends at the target sparsity."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch as st


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 32), nn.ReLU(),
                         nn.Linear(32, 3))


def _loop(model, cfg, steps, teacher=None):
    opt = torch.optim.Adam(st.prune_param_groups(model, lr=1e-3))
    g = torch.Generator().manual_seed(0)
    kept = []
    for _ in range(steps):
        x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        logits = model(x)
        loss = F.cross_entropy(logits, y) if teacher is None else \
            st.distill_loss(logits, teacher(x), T=2.0, alpha=0.5, labels=y)
        loss = loss + st.penalty(model)
        assert torch.isfinite(loss)
        loss.backward(); opt.step(); opt.zero_grad(); st.step(model)
        kept.append(st.sparsity(model)["kept"])
    return kept


@pytest.mark.parametrize("cfg", [
    st.Magnitude(remaining=0.1, total_steps=12, warmup_steps=2),
    st.HardMovement(remaining=0.1, total_steps=12, warmup_steps=2),
    st.HardMovement(remaining=0.1, total_steps=12, warmup_steps=2, scope="global", global_every=5),
])
def test_reaches_target_sparsity_at_the_end(cfg):
    model = _model()
    teacher = _model().eval()
    st.prune_(model, cfg)
    kept = _loop(model, cfg, cfg.total_steps, teacher=teacher)
    total = st.sparsity(model)["weights"]
    assert kept[0] == total                                           # initial warm-up: nothing pruned
    if cfg.scope == "layer":
        assert all(a >= b for a, b in zip(kept, kept[1:]))           # the cubic only removes weights
    s = st.sparsity(model)
    if cfg.scope == "layer":
        for name, mask in st.prune.layer_masks(model).items():     # int(0.1 n) as the reference, >= the floor
            n = mask.numel()
            assert int(mask.sum()) == max(int(0.1 * n + 1e-9), st.prune.min_kept(n)), name
    else:
        assert s["kept"] == pytest.approx(0.1 * total, abs=1)
    assert st.report(model).totals["sparsity"] == pytest.approx(s["sparsity"])


def test_soft_movement_trains_and_prunes():
    model = _model()
    cfg = st.SoftMovement(total_steps=15, warmup_steps=1, tau=0.1, lam=400.0, scores_lr=0.5)
    st.prune_(model, cfg)
    _loop(model, cfg, cfg.total_steps)
    assert 0.0 < st.sparsity(model)["sparsity"] < 1.0                 # it emerges from lambda: measured
    for name, m, mk in st.pruned_layers(model):
        assert float(mk.value) == pytest.approx(0.1)
