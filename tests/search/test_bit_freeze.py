"""Meeting a weight budget with Adam/AdamW (issue 11, item 2): quantizer parameters at a relative
learning rate (``quantizer_param_groups``) and the bit-freezing rule run by ``st.step``."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch as st
from slimtorch.errors import ConfigError
from slimtorch import cost as B
from slimtorch.search.penalty import get_budget

MAX_STEPS_TO_MEET = 60


def _mlp(weight_scale):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        for lin in m[::2]:
            lin.weight.mul_(weight_scale)       # a trained net's range: d and qmax far from lr
    return m


def _target():
    ref = _mlp(1.0)
    st.quantize_(ref, st.Uhlich(w_bits=4, a_bits=4, bit_set=(2, 4, 8)))
    return 0.65 * B.weight_bytes(ref)           # 65% of the 4-bit bytes


def _train(opt_cls, weight_scale=8.0, steps=150, groups=True, **cfg):
    m = _mlp(weight_scale)
    x, y = torch.randn(512, 64), torch.randint(0, 10, (512,))
    target = _target()
    st.quantize_(m, st.Uhlich(w_bits=4, a_bits=4, bit_set=(2, 4, 8), a_init="float",
                              target_weight=target, target_unit="B", **cfg))
    st.calibrate(m, [(x[:128],)], num_batches=1)
    params = st.quantizer_param_groups(m, lr=1e-3) if groups else m.parameters()
    opt = opt_cls(params, lr=1e-3)
    sizes = []
    for i in range(steps):
        j = (i * 64) % 512
        loss = F.cross_entropy(m(x[j:j + 64]), y[j:j + 64]) + st.penalty(m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        st.step(m)
        sizes.append(B.weight_bytes(m))
    return m, sizes, target


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_and_adamw_meet_the_budget_and_stay_under_it(opt_cls):
    m, sizes, target = _train(opt_cls)
    assert sizes[0] > target
    first = next(i for i, s in enumerate(sizes) if s <= target)
    assert first < MAX_STEPS_TO_MEET
    assert max(sizes[first:]) <= target and sizes[-1] <= target
    b = get_budget(m)
    assert b.frozen_at == first + 1 + b.freeze_after - 1       # frozen after k met steps
    assert all(set(v.values()) <= {2, 4, 8} for v in st.read_plan(m).values())


def test_freeze_at_meets_an_unmet_weight_budget_by_lowering_bits():
    """Plain Adam at lr 1e-3 on the raw parameters cannot reach the budget in time (qmax moves ~lr per
    step); ``freeze_at`` lowers bits greedily and freezes, so the run still ends under the target."""
    m, sizes, target = _train(torch.optim.Adam, weight_scale=30.0, steps=40, groups=False, freeze_at=30)
    assert min(sizes[:29]) > target
    b = get_budget(m)
    assert b.frozen_at == 30 and b.projected
    assert max(sizes[29:]) <= target


def test_param_groups_relative_lr_and_no_weight_decay():
    m = _mlp(1.0)
    st.quantize_(m, st.Uhlich(w_bits=4, a_bits=4))
    st.calibrate(m, [(torch.randn(32, 64),)], num_batches=1)
    groups = st.quantizer_param_groups(m, lr=1e-3, rel_lr=0.05, weight_decay=1e-2)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in m.parameters()) and len(set(seen)) == len(seen)
    assert groups[0]["lr"] == 1e-3 and groups[0]["weight_decay"] == 1e-2
    q = m[0].parametrizations.weight[0]
    by_param = {id(g["params"][0]): g for g in groups[1:]}
    for name in ("d", "qmax"):
        p = getattr(q, name)
        assert by_param[id(p)]["lr"] == pytest.approx(0.05 * float(p.detach())) and by_param[id(p)]["weight_decay"] == 0
    with pytest.raises(ConfigError, match="rel_lr"):
        st.quantizer_param_groups(m, lr=1e-3, rel_lr=0)


@pytest.mark.parametrize("kw", [dict(freeze_after=0), dict(freeze_at=-1), dict(freeze_after=2.5)])
def test_freeze_options_validated(kw):
    with pytest.raises(ConfigError, match="steps"):
        st.Uhlich(**kw)
    with pytest.raises(ConfigError, match="steps"):
        st.MemoryBudget(weight=1.0, **kw)
