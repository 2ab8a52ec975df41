"""Uhlich et al. uniform quantizer (U1/U2/U3): STE gradients vs the paper's hand formulas (Eq. 3a-c),
boundedness of U3, inferred bitwidths (Sec. 4), bit sets, tied bits, export codes, config errors."""
import math

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.errors import ConfigError
from slimtorch.quant import build_quantizer
from slimtorch.quant.uhlich import Uhlich, UniformQuantizer, tie
from slimtorch.search.penalty import read_plan

from per_element_grads import per_element_grads  # noqa: E402

LN2 = math.log(2.0)


def make(p, role="weight", dtype=torch.float64, signed=True, **values):
    q = UniformQuantizer(p, role, signed=signed, init="paper").to(dtype)
    q._set(**values)
    q._initialized.fill_(True)
    q._sync()
    return q


def _x(n=160, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("values", [dict(b=4.3, d=0.09), dict(b=3.0, d=0.125), dict(b=6.4, d=0.02)])
def test_u1_gradients_match_eq3a(values):
    q = make("U1", **values)
    x = _x(scale=3 * values["d"] * 2 ** (round(values["b"]) - 1) / 2)
    y, g = per_element_grads(q, x)
    b = round(values["b"])
    d = values["d"]
    dq = 2.0 ** round(math.log2(d))
    top = (2 ** (b - 1) - 1) * dq
    inside = x.abs() <= top
    assert 0 < inside.sum() < x.numel()
    sgn = torch.sign(x)
    assert torch.allclose(y[inside], dq * torch.round(x[inside] / dq))
    assert torch.allclose(y[~inside], sgn[~inside] * top)
    want_b = torch.where(inside, 0.0, 2 ** (b - 1) * LN2 * dq * sgn)
    # d_q = 2^round(log2 d) with STE: the chain factor d_q/d (1 when d is a power of two)
    want_d = torch.where(inside, (y - x) / d, (2 ** (b - 1) - 1) * sgn * dq / d)
    assert torch.allclose(g["b"], want_b, atol=1e-12)
    assert torch.allclose(g["d"], want_d, atol=1e-12)
    assert torch.equal(g["x"], inside.double())


@pytest.mark.parametrize("values", [dict(b=4.2, qmax=0.71), dict(b=3.0, qmax=0.375), dict(b=5.6, qmax=1.3)])
def test_u2_gradients_match_eq3b(values):
    q = make("U2", **values)
    x = _x(scale=values["qmax"])
    y, g = per_element_grads(q, x)
    b, qmax = round(values["b"]), values["qmax"]
    dq = 2.0 ** round(math.log2(qmax / (2 ** (b - 1) - 1)))
    top = min(round(qmax / dq), 2 ** (b - 1) - 1) * dq
    inside = x.abs() <= top
    assert 0 < inside.sum() < x.numel()
    sgn = torch.sign(x)
    want_b = torch.where(inside, -(2 ** (b - 1) * LN2 / (2 ** (b - 1) - 1)) * (y - x), 0.0)
    want_q = torch.where(inside, (y - x) / qmax, sgn)
    assert torch.allclose(g["b"], want_b, atol=1e-12)
    assert torch.allclose(g["qmax"], want_q, atol=1e-12)
    assert torch.equal(g["x"], inside.double())


@pytest.mark.parametrize("values", [dict(d=0.09, qmax=0.71), dict(d=0.125, qmax=0.875), dict(d=0.011, qmax=0.3)])
def test_u3_gradients_match_eq3c(values):
    q = make("U3", **values)
    x = _x(scale=values["qmax"])
    y, g = per_element_grads(q, x)
    d, qmax = values["d"], values["qmax"]
    dq = 2.0 ** round(math.log2(d))
    top = round(qmax / dq) * dq
    inside = x.abs() <= top
    assert 0 < inside.sum() < x.numel()
    sgn = torch.sign(x)
    assert torch.allclose(y[inside], dq * torch.round(x[inside] / dq))
    assert torch.allclose(y[~inside], sgn[~inside] * top)
    assert torch.allclose(g["d"], torch.where(inside, (y - x) / d, 0.0), atol=1e-12)
    assert torch.allclose(g["qmax"], torch.where(inside, 0.0, sgn), atol=1e-12)
    assert torch.equal(g["x"], inside.double())


def test_u3_unsigned_activation_gradients():
    q = make("U3", role="activation", signed=False, d=0.125, qmax=1.875)
    x = _x(scale=1.5)
    y, g = per_element_grads(q, x)
    assert torch.equal(y, torch.clamp(torch.round(x / 0.125), 0, 15) * 0.125)
    inside = (x >= 0) & (x <= 1.875)
    assert torch.allclose(g["d"], torch.where(inside, (y - x) / 0.125, 0.0), atol=1e-12)
    assert torch.allclose(g["qmax"], (x > 1.875).double(), atol=1e-12)
    assert torch.equal(g["x"], inside.double())


def _max_grads(p, b, d=2.0 ** -4, qmax=None):
    qmax = qmax if qmax is not None else (2 ** (b - 1) - 1) * d
    q = make(p, b=float(b), d=d, qmax=qmax)
    top = qmax
    x = torch.linspace(-2 * top, 2 * top, 801, dtype=torch.float64) + 1e-7
    _, g = per_element_grads(q, x)
    return {n: float(v.abs().max()) for n, v in g.items() if n != "x"}


def test_u3_gradients_bounded_at_every_bitwidth_u1_grows():
    u1 = []
    for b in range(2, 9):
        m = _max_grads("U3", b)
        assert m["d"] <= 0.5 + 1e-12 and m["qmax"] <= 1 + 1e-12      # paper: bounded, any b
        assert m["d"] > 0.4 and m["qmax"] == pytest.approx(1.0)
        u1.append(_max_grads("U1", b))
    # U1: |dQ/db| = 2^(b-1) ln2 d and |dQ/dd| = 2^(b-1) - 1 outside the range grow exponentially
    for lo, hi in zip(u1, u1[1:]):
        assert hi["b"] == pytest.approx(2 * lo["b"])
        assert hi["d"] > 1.9 * lo["d"] or lo["d"] == 1
    assert u1[-1]["d"] == pytest.approx(127) and u1[-1]["b"] == pytest.approx(128 * LN2 / 16)


def test_u2_gradient_scales_drift_apart_with_bits():
    """U2 at a fixed range qmax: dQ/dqmax stays 1 outside while dQ/db (~ln2 d/2) shrinks as 2^-b,
    so the ratio of the two gradient scales (the conditioning the paper criticises) grows as 2^b;
    for U3 both scales are fixed (1/2 and 1)."""
    ratios = []
    for b in range(2, 9):
        m = _max_grads("U2", b, qmax=1.0)
        assert m["qmax"] == pytest.approx(1.0)
        ratios.append(m["qmax"] / m["b"])
    for lo, hi in zip(ratios, ratios[1:]):
        assert hi > 1.6 * lo
    assert ratios[-1] > 50 * ratios[0]


def test_u3_bound_with_non_power_of_two_d():
    # with the log-domain STE the bound is d_q/(2d) <= 1/sqrt(2) for any float d
    for d in (0.09, 0.06, 0.0125):
        q = make("U3", d=d, qmax=0.8)
        _, g = per_element_grads(q, torch.linspace(-1, 1, 401, dtype=torch.float64))
        dq = 2.0 ** round(math.log2(d))
        assert g["d"].abs().max() <= dq / (2 * d) + 1e-12 <= 1 / math.sqrt(2) + 1e-12


@pytest.mark.parametrize("d,qmax,signed,want", [
    (0.125, 0.875, True, 4), (0.125, 1.0, True, 5), (0.125, 0.9, True, 4), (0.125, 0.125, True, 2),
    (0.125, 1.875, False, 4), (0.125, 2.0, False, 5), (0.125, 0.125, False, 1), (2 ** -6, 1.99, True, 8), (2 ** -6, 2.0, True, 9)])
def test_inferred_bits_formula(d, qmax, signed, want):
    q = make("U3", role="weight" if signed else "activation", signed=signed, d=d, qmax=qmax)
    r = round(qmax / d)
    formula = math.ceil(math.log2(r + 1) + (1 if signed else 0))
    assert q.bits == max(formula, 2 if signed else 1) == want
    assert float(q.bits_tensor().detach()) == want


def test_bits_tensor_gradient_is_ste_of_formula():
    q = make("U3", d=0.125, qmax=0.8)
    q.bits_tensor().backward()
    r = round(0.8 / 0.125)
    assert q.qmax.grad.item() == pytest.approx(1 / ((r + 1) * LN2 * 0.125))
    assert q.d.grad.item() == pytest.approx(-r / ((r + 1) * LN2 * 0.125))


def test_u1_u2_bits_are_rounded_b():
    assert make("U1", b=4.4, d=0.1).bits == 4
    assert make("U2", b=5.6, qmax=1.0).bits == 6
    assert make("U1", b=9.7, d=0.1).bits == 8          # clamped to the b range
    assert make("U1", role="activation", signed=False, b=1.2, d=0.1).bits == 1


def test_bit_set_rounds_up_and_extends_the_range():
    q = UniformQuantizer("U3", "weight", init="paper", bit_set=(2, 4, 8)).double()
    for qmax, own, snapped in ((0.125, 2, 2), (0.375, 3, 4), (0.875, 4, 4), (1.0, 5, 8), (20.0, 9, 8)):
        q._set(d=0.125, qmax=qmax)
        assert q.own_bits_tensor().item() == own and q.bits == snapped
        d, q_n, q_p = q.levels()
        assert q_p.item() == 2 ** (snapped - 1) - 1 and q_n.item() == -q_p.item()
    q._set(d=0.125, qmax=0.375)                        # 3 bits -> 4: levels up to 7 d
    x = torch.tensor([0.5, 0.85, 2.0], dtype=torch.float64)
    assert torch.equal(q(x).detach(), torch.tensor([0.5, 0.875, 0.875], dtype=torch.float64))


def test_tie_bits_uses_the_max():
    wq = make("U3", d=0.125, qmax=0.375)                                   # 3 bits
    aq = make("U3", role="activation", signed=False, d=0.125, qmax=3.0)    # 24 levels -> 5 bits
    assert (wq.bits, aq.bits) == (3, 5)
    tie(wq, aq)
    assert wq.bits == aq.bits == 5
    assert wq.levels()[2].item() == 15 and aq.levels()[2].item() == 31
    wq.bits_tensor().backward()
    assert wq.qmax.grad.item() == 0 and aq.qmax.grad.item() > 0        # max: gradient to the larger


def _quantized_cnn(cfg):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    st.quantize_(m, cfg)
    m(torch.randn(2, 1, 8, 8))
    return m


def test_config_handler_attaches_all_layers_and_report_shows_inferred_bits():
    m = _quantized_cnn(Uhlich())
    rows = {r["name"]: r for r in st.report(m).rows}
    assert set(rows) == {"0", "3"} and all(r["w_bits"] == 4 and r["a_bits"] == 4 for r in rows.values())
    wq = m[0].parametrizations.weight[0]
    assert wq.d.item() == 2.0 ** math.floor(math.log2(m[0].parametrizations.weight.original.abs().max()
                                                        .item() / 7))
    assert m[0].input_quantizer.signed is True and m[3].input_quantizer.signed is False
    assert m[3].input_quantizer.qmax.item() == pytest.approx(1.875, abs=1e-4)
    with torch.no_grad():
        wq.qmax.fill_(wq.d.item() * 30)                # 30 levels -> 6 bits
    assert st.report(m).rows[0]["w_bits"] == 6
    assert read_plan(m)["0"] == {"w_bits": 6, "a_bits": 4}


def test_config_tie_and_bit_set_through_quantize():
    m = _quantized_cnn(Uhlich(tie_bits=True, bit_set=(2, 4, 8), w_bits=3, a_bits=3))
    for mod in (m[0], m[3]):
        assert mod.parametrizations.weight[0].bits == mod.input_quantizer.bits == 4


@pytest.mark.parametrize("p", ["U1", "U2", "U3"])
@pytest.mark.parametrize("role,signed", [("weight", True), ("activation", False), ("activation", True)])
def test_encode_decode_bit_exact(p, role, signed):
    torch.manual_seed(1)
    q = UniformQuantizer(p, role, signed=signed, init="float", bit_set=(2, 3, 4, 8) if p == "U2" else None)
    x = torch.randn(500) * 0.7
    q.initialize(x)
    with torch.no_grad():
        if "qmax" in q._parameters:
            q.qmax.mul_(0.83)
        y = q(x)
    codes = q.encode(x)
    assert codes.dtype == torch.int64 and codes.min() >= 0 and codes.max() < 2 ** q.bits
    assert torch.equal(q.decode(codes), y)
    q2 = build_quantizer(q.spec())
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2(x), y) and q2.bits == q.bits


def test_tied_spec_rebuilds_same_forward():
    wq = make("U3", d=0.125, qmax=0.375)
    aq = make("U3", role="activation", signed=False, d=0.125, qmax=3.0)
    tie(wq, aq)
    x = _x(scale=2.0)
    q2 = build_quantizer(wq.spec()).double()
    q2.load_state_dict(wq.state_dict())
    assert q2.bits == 5 and torch.equal(q2(x), wq(x))


def test_value_and_gradient_clipping():
    q = make("U3", d=0.5, qmax=0.25)
    q.clip_values_()
    assert q.d.item() < q.qmax.item()
    with torch.no_grad():
        q.d.fill_(5.0), q.qmax.fill_(1000.0)
    q.clip_values_()
    assert q.d.item() == pytest.approx(1 - 1e-5) and q.qmax.item() == pytest.approx(127 - 1e-5)
    q = UniformQuantizer("U3", "weight", init="paper", clip_grads=True).double()
    x = torch.linspace(0.01, 30, 1001, dtype=torch.float64)     # mostly clipped: sum of sign(x) >> d
    q(x).sum().backward()
    d = q.d.item()
    assert abs(q.qmax.grad.item()) == pytest.approx(d) and abs(q.d.grad.item()) <= d + 1e-12


@pytest.mark.parametrize("kw,msg", [
    (dict(bit_set=()), "empty"), (dict(bit_set=(2, 9)), "out of range"), (dict(bit_set=(0, 4)), "out of range"),
    (dict(bit_set=(2.5, 4)), "out of range"), (dict(w_d_range=(1.0, 0.5)), "min must be < max"),
    (dict(a_qmax_range=(2.0, 2.0)), "min must be < max"), (dict(w_b_range=(4, 3)), "min must be < max"),
    (dict(kind="pow2", parametrization="U3"), "does not fit"), (dict(kind="int"), "kind"),
    (dict(target_weight=-1.0), "budget"), (dict(weights="per_channel"), "per-tensor"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        Uhlich(**kw)


def test_quantizer_errors():
    with pytest.raises(ConfigError, match="parametrization"):
        UniformQuantizer("P3")
    with pytest.raises(ConfigError, match="min must be < max"):
        UniformQuantizer("U3", ranges={"qmax": (3.0, 1.0)})
    with pytest.raises(ConfigError, match="empty"):
        UniformQuantizer("U3", bit_set=[])


def test_budget_below_feasible_minimum_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"feasible minimum is \d"):
        _quantized_cnn(Uhlich(target_weight=0.05))


def test_config_roundtrip_yaml(tmp_path):
    cfg = Uhlich(kind="pow2", bit_set=(2, 4, 8), target_weight=30.0, w_qmax_range=(0.01, 8.0))
    path = tmp_path / "c.yaml"
    st.save_config(cfg, path)
    assert st.load_config(path) == cfg


def test_no_size_gradient_at_the_smallest_bitwidth():
    q = make("U3", d=0.125, qmax=0.125)                   # one level: b = 2 = min for signed weights
    b = q.bits_tensor()
    b.backward()
    assert b.item() == 2 and q.d.grad.item() == 0 and q.qmax.grad.item() == 0
    q = make("U3", d=0.125, qmax=0.25)                    # 3 bits: gradient flows
    q.bits_tensor().backward()
    assert q.d.grad.item() < 0 < q.qmax.grad.item()
