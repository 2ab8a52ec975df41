"""The shared fake-quant core against the LSQ / LSQ+ equations (papers.md Sec. 2a)."""
import math

import pytest
import torch

from slimtorch.quant.fake_quant import dequantize, fake_quant, qrange, quantize_int, round_ste


def hand_grads(x, s, beta, qn, qp, up, g):
    """Piecewise formulas, element by element: u=(x-beta)/s;
    below: dx=0, ds=qn, dbeta=1; above: dx=0, ds=qp, dbeta=1; inside: dx=1, ds=round(u)-u, dbeta=0."""
    dx, ds, db = torch.zeros_like(x), 0.0, 0.0
    for i, (xi, ui) in enumerate(zip(x.tolist(), up.tolist())):
        u = (xi - beta) / s
        if u < qn:
            ds += ui * qn; db += ui
        elif u > qp:
            ds += ui * qp; db += ui
        else:
            dx[i] = ui; ds += ui * (round(u) - u)
    return dx, ds * g, db * g


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_gradients_match_hand_formulas(bits, signed):
    torch.manual_seed(bits)
    qn, qp = qrange(bits, signed)
    x = (torch.randn(300, dtype=torch.float64) * 2).requires_grad_(True)
    s = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.21, dtype=torch.float64, requires_grad=True)
    g = 1 / math.sqrt(300 * qp)
    up = torch.randn(300, dtype=torch.float64)
    fake_quant(x, s, qn, qp, b, g).backward(up)
    dx, ds, db = hand_grads(x.detach(), 0.37, -0.21, qn, qp, up, g)
    assert torch.allclose(x.grad, dx)
    assert s.grad.item() == pytest.approx(ds, rel=1e-9, abs=1e-12)
    assert b.grad.item() == pytest.approx(db, rel=1e-9, abs=1e-12)


def test_gradients_equal_composed_ste_autograd():
    """Same gradients as the textbook STE composition round_ste(clamp(...)) through autograd."""
    torch.manual_seed(0)
    x1 = (torch.randn(4, 5, 6, dtype=torch.float64) * 6).requires_grad_(True)
    s1 = (torch.rand(4, 1, 1, dtype=torch.float64) + 0.1).requires_grad_(True)
    x2, s2 = x1.detach().clone().requires_grad_(True), s1.detach().clone().requires_grad_(True)
    qn, qp = -8, 7
    fake_quant(x1, s1, qn, qp).pow(2).sum().backward()
    u = x2 / s2
    inside = ((u >= qn) & (u <= qp)).to(u.dtype)
    clamped = torch.clamp(u, qn, qp)  # torch.clamp passes grad inside only
    (round_ste(clamped) * s2).pow(2).sum().backward()
    assert torch.allclose(x1.grad, x2.grad)
    assert torch.allclose(s1.grad, s2.grad)
    assert inside.sum() < inside.numel()  # both regimes exercised


def test_level_bound_gradients():
    """d x_hat / d q_p = s above the range, d x_hat / d q_n = s below (used by Uhlich's U2/U3)."""
    x = torch.tensor([-5.0, -0.3, 0.2, 4.0])
    s = torch.tensor(0.5)
    qn = torch.tensor(-2.0, requires_grad=True)
    qp = torch.tensor(3.0, requires_grad=True)
    fake_quant(x, s, qn, qp).sum().backward()
    assert qn.grad.item() == pytest.approx(0.5) and qp.grad.item() == pytest.approx(0.5)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_at_most_2_pow_b_levels(bits):
    x = torch.randn(10000) * 3
    for signed in (True, False):
        qn, qp = qrange(bits, signed)
        y = fake_quant(x, torch.tensor(0.05), qn, qp, torch.tensor(0.3))
        assert y.unique().numel() <= 2**bits


def test_integer_path_is_exact():
    torch.manual_seed(1)
    x = torch.randn(64, 32)
    s, b = torch.tensor(0.031), torch.tensor(0.12)
    xi = quantize_int(x, s, 0, 15, b)
    assert xi.min() >= 0 and xi.max() <= 15 and torch.equal(xi, xi.round())
    assert torch.equal(dequantize(xi, s, b), fake_quant(x, s, 0, 15, b))


def test_qrange():
    assert qrange(4, True) == (-8, 7) and qrange(4, False) == (0, 15)
    assert qrange(2, True, narrow=True) == (-1, 1)
