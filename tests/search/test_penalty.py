"""Memory-budget penalties (Uhlich et al. Eq. 8, 10): zero under budget, gradient 2 lambda g dS/dtheta
above it; feasibility errors; value/gradient stabilisers; the learned plan."""
import math

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.errors import ConfigError
from slimtorch.quant.uhlich import Uhlich
from slimtorch import cost as B
from slimtorch.search.penalty import (MemoryBudget, attach_budget, get_budget, clip_quant_values_, penalty, read_plan,
                                      register_penalty, set_grad_clip, step, _PENALTIES)

LN2 = math.log(2.0)


def _net(cfg=None, dtype=torch.float64):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(dtype)
    st.quantize_(m, cfg or Uhlich())
    m(torch.randn(4, 16, dtype=dtype))
    return m


def _wq(m, i):
    return m[i].parametrizations.weight[0]


def test_zero_under_budget():
    m = _net()
    b = MemoryBudget(weight=100.0, act_sum=100.0, act_max=100.0)
    p = b(m)
    assert p.item() == 0.0
    p.backward()
    assert all(q.grad is None or q.grad.abs().max() == 0 for q in m.parameters())
    assert b.met(m)


def _u3_weight_grads(q, n):
    """dS/dd and dS/dqmax of ceil(n b / 8) for a U3 weight quantizer (hand formula, Sec. 4)."""
    d = q.d.item()
    dq = 2.0 ** round(math.log2(d))
    r = round(q.qmax.item() / dq)
    db_dqmax = 1 / ((r + 1) * LN2 * dq)
    db_dd = -r / ((r + 1) * LN2 * d)
    return n / 8 * db_dd, n / 8 * db_dqmax


@pytest.mark.parametrize("unit,scale", [("B", 1.0), ("kB", 1024.0)])
def test_weight_penalty_gradient_matches_hand_formula(unit, scale):
    m = _net()
    size = B.weight_bytes(m)
    target = (size - 300) / scale
    lam = 0.3
    b = MemoryBudget(weight=target, unit=unit, lambdas=(lam, 0, 0))
    p = b(m)
    g = size / scale - target
    assert p.item() == pytest.approx(lam * g ** 2)
    p.backward()
    for i, n in ((0, 16 * 32), (2, 32 * 8)):
        q = _wq(m, i)
        dd, dqmax = _u3_weight_grads(q, n)
        assert q.d.grad.item() == pytest.approx(2 * lam * g * dd / scale, rel=1e-9)
        assert q.qmax.grad.item() == pytest.approx(2 * lam * g * dqmax / scale, rel=1e-9)
    assert m[0].input_quantizer.qmax.grad is None


def test_activation_penalties_sum_and_max():
    m = _net()
    acts = B.activation_costs(m)["layers"]             # bytes per sample: 16*4/8 and 32*4/8
    assert acts == {"0": 8, "2": 16}
    lam_s, lam_m = 0.2, 0.7
    b = MemoryBudget(act_sum=20.0, act_max=10.0, unit="B", lambdas=(0, lam_s, lam_m))
    p = b(m)
    assert p.item() == pytest.approx(lam_s * (24 - 20) ** 2 + lam_m * (16 - 10) ** 2)
    p.backward()
    for name, n, both in (("0", 16, False), ("2", 32, True)):
        q = m.get_submodule(name).input_quantizer
        d = q.d.item()
        r = round(q.qmax.item() / d)
        # unsigned activations: b = ceil(log2(qmax/d + 1)); db/dqmax = 1/((r+1) ln2 d)
        ds = n / 8 / ((r + 1) * LN2 * d)
        want = 2 * lam_s * 4 * ds + (2 * lam_m * 6 * ds if both else 0.0)   # max: only the largest
        assert q.qmax.grad.item() == pytest.approx(want, rel=1e-9)


def test_penalty_from_config_and_default_zero():
    m = _net()
    assert penalty(m).item() == 0.0 and penalty(m).dtype == torch.float64
    m = _net(Uhlich(target_weight=0.5, lambdas=(0.1, 0.1, 0.1)))
    kb = B.weight_bytes(m) / 1024
    assert penalty(m).item() == pytest.approx(0.1 * (kb - 0.5) ** 2)
    assert _wq(m, 0).clip_grads and m[0].input_quantizer.clip_grads     # official: on with a target


def test_registered_penalty_terms_are_added():
    m = _net()
    fn = register_penalty(lambda model: torch.tensor(2.5, dtype=torch.float64))
    try:
        attach_budget(m, MemoryBudget(weight=1e6))
        assert penalty(m).item() == 2.5
    finally:
        _PENALTIES.remove(fn)


def test_budget_below_feasible_minimum():
    m = _net()
    feas = MemoryBudget(weight=1.0).feasible_minimum(m)
    # 2-bit weights (U3 min) + float32 bias + d and qmax per quantizer (what the packed file stores)
    want_w = (math.ceil(512 * 2 / 8) + 4 * (32 + 4) + math.ceil(256 * 2 / 8) + 4 * (8 + 4)) / 1024
    assert feas["weight"] == pytest.approx(want_w)
    assert feas["act_max"] == pytest.approx(math.ceil(32 * 1 / 8) / 1024)   # unsigned min 1 bit
    with pytest.raises(ConfigError, match=rf"feasible minimum is {want_w:.4f} kB"):
        MemoryBudget(weight=want_w * 0.99).check(m)
    MemoryBudget(weight=want_w).check(m)
    with pytest.raises(ConfigError, match="act_max=0.001 kB .* feasible minimum"):
        penalty(m, MemoryBudget(act_max=0.001))


def test_feasible_minimum_respects_bit_set_and_tie():
    m = _net(Uhlich(bit_set=(4, 8), tie_bits=True))
    feas = MemoryBudget(weight=1.0, unit="B").feasible_minimum(m)
    assert feas["weight"] == math.ceil(512 * 4 / 8) + 4 * 36 + math.ceil(256 * 4 / 8) + 4 * 12
    assert feas["act_max"] == math.ceil(32 * 4 / 8)


@pytest.mark.parametrize("kw,msg", [(dict(weight=0.0), "> 0"), (dict(act_max=-2), "> 0"),
                                    (dict(unit="MB"), "unit"), (dict(lambdas=(1, 2)), "three")])
def test_budget_validation(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        MemoryBudget(**kw)


def test_learning_under_budget_meets_it():
    """SGD on task loss + penalty drives the weight size from 8-bit down to the target; it then
    hovers at the boundary (penalty 0 below it), as the official code, which keeps the best
    checkpoint that meets the constraints."""
    torch.manual_seed(0)
    m = _net(Uhlich(w_bits=8, a_bits=8, target_weight=600.0, target_unit="B", lambdas=(1e-2, 0, 0)),
             dtype=torch.float32)
    x, y = torch.randn(64, 16), torch.randint(0, 8, (64,))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    sizes = [B.weight_bytes(m)]
    for _ in range(200):
        loss = nn.functional.cross_entropy(m(x), y) + penalty(m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step(m)
        sizes.append(B.weight_bytes(m))
    assert sizes[0] == 960 and min(sizes) <= 600
    assert max(sizes[100:]) <= 1.1 * 600
    assert get_budget(m).met(m) == (sizes[-1] <= 600)


def test_step_clips_values_and_grad_clip_switch():
    m = _net()
    q = _wq(m, 0)
    with torch.no_grad():
        q.d.fill_(3.0)
        q.qmax.fill_(0.5)
    assert clip_quant_values_(m) == 4
    assert q.d.item() < q.qmax.item() and q.d.item() <= 1.0
    assert set_grad_clip(m, True) == 4 and q.clip_grads
    step(m)


def test_read_plan_roundtrips_into_quantize():
    m = _net(Uhlich(bit_set=(2, 4, 8)))
    with torch.no_grad():
        _wq(m, 0).qmax.mul_(3)                  # 7 -> 21 levels: 6 bits -> 8
    plan = read_plan(m)
    assert plan == {"0": {"w_bits": 8, "a_bits": 4}, "2": {"w_bits": 4, "a_bits": 4}}
    fresh = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    st.quantize_(fresh, st.LSQ(), plan=plan)
    assert read_plan(fresh) == plan


def test_freeze_bits_fixes_sizes_and_keeps_learning_steps():
    from slimtorch.search.penalty import freeze_bits_
    m = _net()
    with torch.no_grad():
        _wq(m, 0).qmax.mul_(0.4)                # 7 -> 3 levels: 3 bits
    plan = freeze_bits_(m)
    assert plan == read_plan(m) and plan["0"]["w_bits"] == 3
    q = _wq(m, 0)
    assert q.frozen and q.levels()[2].item() == 3            # full 3-bit range, a constant
    b = MemoryBudget(weight=0.2, unit="kB")                 # far over budget: penalty > 0 ...
    p = b(m)
    assert p.item() > 0 and not p.requires_grad              # ... but no gradient: bits are fixed
    x = torch.randn(8, 16, dtype=torch.float64) * 3
    m(x).sum().backward()
    assert q.d.grad is not None and q.d.grad.abs() > 0       # the step size still learns
