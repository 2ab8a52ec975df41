"""LSQ+ with an integer zero point: forward = s * clamp(round(x / s), q_n + z, q_p + z) with
z = round(beta / s); gradients equal LSQ+'s (Eq. 4-5) when beta lies on the grid."""
import pytest
import torch

import slimtorch as st
from slimtorch.errors import ConfigError
from slimtorch.quant import LSQQuantizer


def _pair(bits, s, beta):
    out = []
    for integer in (False, True):
        q = LSQQuantizer(bits, "activation", learn_offset=True, integer_offset=integer)
        with torch.no_grad():
            q.scale.fill_(s)
            q.offset.fill_(beta)
        q._initialized.fill_(True)
        q._sync()
        out.append(q)
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matches_lsq_plus_when_offset_is_on_the_grid(bits):
    torch.manual_seed(bits)
    s, z = 0.25, -(2 ** bits) // 3
    plain, integer = _pair(bits, s, s * z)
    x = torch.randn(4, 64, dtype=torch.float32) * s * 2 ** (bits - 1)
    outs, grads = [], []
    for q in (plain, integer):
        xr = x.clone().requires_grad_()
        y = q(xr)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        outs.append(y.detach())
        grads.append((xr.grad, q.scale.grad, q.offset.grad))
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_offset_rounds_to_whole_steps_and_keeps_zero_on_the_grid():
    s = 0.5
    _, q = _pair(4, s, -1.3)                         # beta / s = -2.6 -> z = -3
    x = torch.linspace(-4, 8, 200)
    want = torch.clamp(torch.round(x / s), -3, 12) * s
    assert torch.equal(q(x), want)
    p = q.quant_params()
    assert (p["q_n"], p["q_p"], p["offset"]) == (-3, 12, None)
    assert torch.equal(q.decode(q.encode(x)), q(x))
    _, far = _pair(4, s, 5.0)                        # all-positive offset: clamped, 0 stays a level
    assert far.quant_params()["q_n"] == 0
    _, low = _pair(4, s, -50.0)
    assert low.quant_params()["q_p"] == 0


def test_offset_gradient_off_grid_is_the_count_outside():
    _, q = _pair(3, 1.0, -2.2)                       # z = -2: levels [-2, 5]
    x = torch.tensor([-9.0, -1.0, 0.4, 3.0, 7.0, 11.0])
    q(x).sum().backward()
    g = 1 / (6 * 7) ** 0.5                           # grad scale 1/sqrt(N * Q_P): 1-D input, N = 6
    assert q.offset.grad.item() == pytest.approx(3 * g, rel=1e-6)   # -9 below, 7 and 11 above


def test_config_and_errors():
    with pytest.raises(ConfigError, match="learn_offset"):
        LSQQuantizer(4, "activation", integer_offset=True)
    with pytest.raises(ConfigError, match="integer_offset"):
        st.LSQ(integer_offset=True)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    st.quantize_(m, st.LSQPlus(integer_offset=True))
    st.calibrate(m, [torch.randn(16, 6)])
    aq = m[0].input_quantizer
    assert aq.integer_offset and aq.spec()["integer_offset"] is True
    assert "integer zero point" in repr(aq)


def test_no_offset_gradient_while_the_zero_shift_is_clamped():
    _, q = _pair(4, 0.5, 5.0)                        # beta / s = 10 > -q_n = 0: z clamped to 0
    x = torch.linspace(-4, 12, 50)
    q(x).sum().backward()
    assert q.offset.grad.item() == 0.0
    assert q.scale.grad is not None and q.scale.grad.abs().item() > 0
