"""Uhlich et al. power-of-two quantizer (P1/P2/P3): forward (Eq. 4), STE gradients vs hand formulas
(Eq. 5, 6 and the chain rule for P1/P2), inferred bitwidth, zero level, export codes."""
import math

import pytest
import torch

from slimtorch.errors import ConfigError
from slimtorch.quant import build_quantizer
from slimtorch.quant.pow2 import Pow2Quantizer, pow2_quant
from slimtorch.quant.uhlich import Uhlich

from per_element_grads import per_element_grads  # noqa: E402

LN2 = math.log(2.0)


WIDE = {"qmin": (2.0 ** -100, 2.0 ** 100), "qmax": (2.0 ** -100, 2.0 ** 100)}


def make(p, role="weight", signed=True, with_zero=False, ranges=None, **values):
    q = Pow2Quantizer(p, role, signed=signed, with_zero=with_zero, init="paper", ranges=ranges).double()
    with torch.no_grad():
        for k, v in values.items():
            getattr(q, k).fill_(v)
    q._initialized.fill_(True)
    q._sync()
    return q


def reference(x, qmin, qmax, signed=True, with_zero=False):
    out = []
    for v in x.tolist():
        s = -1.0 if (signed and v < 0) else 1.0
        a = abs(v) if signed else max(v, 0.0)
        if with_zero and a < qmin / math.sqrt(2):
            out.append(0.0)
        elif a < qmin:
            out.append(s * qmin)
        elif a >= qmax:
            out.append(s * qmax)
        else:
            out.append(s * 2.0 ** round(math.log2(a)))
    return torch.tensor(out, dtype=torch.float64)


def _x(n=200, scale=1.0, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _bands(x, qmin, qmax):
    a = x.abs()
    return a < qmin, (a >= qmin) & (a < qmax), a >= qmax


def test_forward_eq4_and_dx_eq5():
    x = torch.cat([_x(scale=2.0), torch.tensor([0.0, 2.0 ** -5, 0.5, -0.5], dtype=torch.float64)])
    qmin, qmax = torch.tensor(2.0 ** -5), torch.tensor(0.5)
    for signed, zero in ((True, False), (True, True), (False, True)):
        xx = x.clone().requires_grad_(True)
        y = pow2_quant(xx, qmin.double(), qmax.double(), signed, zero)
        assert torch.equal(y.detach(), reference(x, 2.0 ** -5, 0.5, signed, zero))
        y.sum().backward()
        a = x.abs() if signed else x.clamp_min(0)
        mid = (a >= 2.0 ** -5) & (a < 0.5)
        want = torch.where(mid, torch.exp2(torch.round(torch.log2(a))) / a, 0.0)
        assert torch.allclose(xx.grad, want)


@pytest.mark.parametrize("values", [dict(qmin=2.0 ** -6, qmax=0.5), dict(qmin=0.011, qmax=0.7)])
def test_p3_gradients_match_eq6(values):
    q = make("P3", **values)
    x = _x(scale=0.4)
    y, g = per_element_grads(q, x)
    qmin_q, qmax_q = (2.0 ** round(math.log2(values[k])) for k in ("qmin", "qmax"))
    assert torch.equal(y, reference(x, qmin_q, qmax_q))
    low, mid, high = _bands(x, qmin_q, qmax_q)
    assert low.any() and mid.any() and high.any()
    sgn = torch.sign(x)
    # Eq. 6: [1, 0] below qmin, [0, 0] in between, [0, 1] above qmax (times sign(x)); the pow2 STE
    # adds the chain factor v_q / v (1 for power-of-two parameters)
    assert torch.allclose(g["qmin"], torch.where(low, sgn * qmin_q / values["qmin"], 0.0))
    assert torch.allclose(g["qmax"], torch.where(high, sgn * qmax_q / values["qmax"], 0.0))
    if values["qmin"] == qmin_q:
        assert set(g["qmin"].unique().tolist()) <= {-1.0, 0.0, 1.0}


@pytest.mark.parametrize("b", [3.2, 4.0])
def test_p1_gradients_chain_rule(b):
    q = make("P1", b=b, qmax=0.5)
    x = _x(scale=0.3)
    y, g = per_element_grads(q, x)
    bi = round(b)
    m = 2 ** (bi - 1)
    qmax = 0.5
    qmin = qmax * 2.0 ** (1 - m)
    assert torch.equal(y, reference(x, qmin, qmax))
    low, mid, high = _bands(x, qmin, qmax)
    assert low.any() and high.any()
    sgn = torch.sign(x)
    assert torch.allclose(g["qmax"], torch.where(high, sgn, torch.where(low, sgn * 2.0 ** (1 - m), 0.0)))
    assert torch.allclose(g["b"], torch.where(low, -sgn * qmin * m * LN2 ** 2, 0.0))


@pytest.mark.parametrize("b", [3.0, 3.4])
def test_p2_gradients_chain_rule(b):
    q = make("P2", b=b, qmin=2.0 ** -4)
    x = _x(scale=0.5)
    y, g = per_element_grads(q, x)
    m = 2 ** (round(b) - 1)
    qmin = 2.0 ** -4
    qmax = qmin * 2.0 ** (m - 1)
    assert torch.equal(y, reference(x, qmin, qmax))
    low, mid, high = _bands(x, qmin, qmax)
    assert low.any() and high.any()
    sgn = torch.sign(x)
    assert torch.allclose(g["qmin"], torch.where(low, sgn, torch.where(high, sgn * 2.0 ** (m - 1), 0.0)))
    assert torch.allclose(g["b"], torch.where(high, sgn * qmax * m * LN2 ** 2, 0.0))


def test_p3_bounded_p2_grows_with_bits():
    p2 = []
    for b in range(2, 9):
        m = 2 ** (b - 1)
        qmax = 2.0 ** (m // 2)                    # keeps qmin = 2^(1-m) qmax inside float32's range
        qmin = qmax * 2.0 ** (1 - m)
        x = torch.cat([torch.linspace(-2 * qmax, 2 * qmax, 401, dtype=torch.float64),
                       torch.tensor([qmin / 2, -qmin / 3])])
        _, g3 = per_element_grads(make("P3", ranges=WIDE, qmin=qmin, qmax=qmax), x)
        assert g3["qmin"].abs().max() == 1 and g3["qmax"].abs().max() == 1
        _, g2 = per_element_grads(make("P2", ranges=WIDE, b=float(b), qmin=qmin), x)
        p2.append(float(g2["qmin"].abs().max()))
    for lo, hi in zip(p2, p2[1:]):
        assert hi > 2 * lo          # 2^(2^(b-1) - 1): doubly exponential
    assert p2[-1] == 2.0 ** 127


@pytest.mark.parametrize("ratio_exp,signed,zero,want", [
    (7, True, False, 4), (8, True, False, 5), (0, True, False, 2), (1, True, False, 2), (3, True, False, 3),
    (7, False, True, 4), (15, False, True, 5), (7, True, True, 5)])
def test_inferred_bits_formula(ratio_exp, signed, zero, want):
    role = "weight" if signed and not zero else "activation"
    q = make("P3", role=role, signed=signed, with_zero=zero, ranges=WIDE, qmin=2.0 ** -10,
             qmax=2.0 ** (ratio_exp - 10))
    # b = ceil(log2(log2(qmax/qmin) + 1) + 1); the +1 is the sign or the zero bit (+2 for both)
    formula = math.ceil(math.log2(ratio_exp + 1) + int(signed) + int(zero))
    assert q.bits == max(formula, q._bmin()) == want


def test_p1_p2_bits_are_rounded_b_and_levels_fit():
    q = make("P1", b=4.4, qmax=1.0)
    qmin, qmax = q.levels()
    assert q.bits == 4 and qmax.item() / qmin.item() == 2.0 ** 7
    q = make("P2", role="activation", signed=False, with_zero=True, b=3.0, qmin=2.0 ** -3)
    qmin, qmax = q.levels()
    assert q.bits == 3 and qmax.item() == 2.0 ** -3 * 2.0 ** 3      # 4 magnitudes + zero


def test_bit_set_extends_downwards():
    q = Pow2Quantizer("P3", "weight", init="paper", bit_set=(2, 4, 8)).double()
    q._set(qmin=2.0 ** -3, qmax=1.0)                      # 4 levels -> 3 bits -> 4 bits
    assert q.own_bits_tensor().item() == 3 and q.bits == 4
    qmin, qmax = q.levels()
    assert qmax.item() == 1.0 and qmin.item() == 2.0 ** -7


@pytest.mark.parametrize("p", ["P1", "P2", "P3"])
@pytest.mark.parametrize("role,signed,zero", [("weight", True, False), ("activation", False, True),
                                              ("activation", True, True)])
def test_encode_decode_bit_exact(p, role, signed, zero):
    torch.manual_seed(0)
    q = Pow2Quantizer(p, role, signed=signed, with_zero=zero, init="float")
    x = torch.cat([torch.randn(600) * 0.6, torch.tensor([0.0, -0.0, 1e-9, -1e-9, 50.0, -50.0])])
    q.initialize(x)
    with torch.no_grad():
        y = q(x)
    codes = q.encode(x)
    assert codes.min() >= 0 and codes.max() < 2 ** q.bits
    out = q.decode(codes)
    assert torch.equal(out, y)
    assert torch.equal(out.view(torch.int32), y.view(torch.int32)) or zero   # same bits (no -0.0 issue)
    q2 = build_quantizer(q.spec())
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2(x), y)


def test_unsigned_without_zero_is_an_error():
    with pytest.raises(ConfigError, match="cannot represent 0"):
        Pow2Quantizer("P3", "activation", signed=False, with_zero=False)
    with pytest.raises(ConfigError, match="cannot represent 0"):
        Uhlich(kind="pow2", activations="unsigned", a_zero=False)


def test_init_matches_official_code():
    q = Pow2Quantizer("P3", "activation", signed=False, with_zero=True, init="paper")
    # nonl(): xmax = 2^round(log2(2^-3 (2^4 - 1))) = 2, xmin = xmax / 2^(2^3 - 1)
    assert q.qmax.item() == pytest.approx(2.0, abs=1e-4) and q.qmin.item() == pytest.approx(2 / 128, abs=1e-4)
    w = torch.tensor([0.3, -0.9, 0.1])
    q = Pow2Quantizer("P3", "weight", init="float")
    q.initialize(w)
    d = 2.0 ** math.floor(math.log2(0.9 / 7))
    qmax = 2.0 ** round(math.log2(7 * d))
    assert q.qmax.item() == pytest.approx(qmax, abs=1e-4)
    assert q.qmin.item() == pytest.approx(qmax / 2 ** 7, abs=1e-4) and q.bits == 4
