"""The Uhlich init keeps the requested bits whatever the data range (issue 11, item 1): when the
step d from max|x| (Sec. 4) falls outside its range, d is moved to the nearest allowed power of two
and qmax follows it (qmax = (2^(b-s) - 1) d, Eq. 1 / Eq. 4 relation)."""
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.errors import ConfigError
from slimtorch.quant.pow2 import Pow2Quantizer
from slimtorch.quant.uhlich import UniformQuantizer

PARAMS = ("U1", "U2", "U3", "P1", "P2", "P3")
SCALES = (1e-5, 1e-2, 1.0, 10.0, 1e3, 1e6)


def make(p, role, signed, bits, **kw):
    cls = UniformQuantizer if p[0] == "U" else Pow2Quantizer
    extra = {"with_zero": role == "activation"} if p[0] == "P" else {}
    return cls(p, role, signed=signed, bits=bits, init="float", **extra, **kw)


def reachable(p, role, signed, bits):
    """P3 with the official ranges holds qmax/qmin <= 2^23 (weights) / 2^22 (activations); b bits
    need 2^(b-1-sign-zero) + 1 levels (Sec. 4): at most 6 bits (7 for signed activations with the
    zero level); every other case reaches every bitwidth of the b range."""
    return p != "P3" or bits <= (7 if role == "activation" and signed else 6)


@pytest.mark.parametrize("p", PARAMS)
@pytest.mark.parametrize("role,signed", [("weight", True), ("activation", True), ("activation", False)])
def test_init_bits_equal_requested_bits_whatever_the_range(p, role, signed):
    lo = 2 if signed else 1
    for bits in range(max(lo, 2 if p[0] == "P" and signed and role == "activation" else lo), 9):
        for scale in SCALES:
            x = torch.randn(256) * scale
            q = make(p, role, signed, bits)
            if not reachable(p, role, signed, bits):
                with pytest.raises(ConfigError, match="cannot be represented"):
                    q.initialize(x)
                continue
            q.initialize(x)
            assert q.bits == bits, (p, role, signed, bits, scale)
            out = q(x)                      # the forward pass runs on the clipped range
            assert torch.isfinite(out).all()


def test_p3_beyond_its_ranges_is_fine_with_a_bit_set():
    q = make("P3", "weight", True, 8, bit_set=(2, 4, 8))
    q.initialize(torch.randn(64))
    assert q.bits == 8


def test_paper_init_keeps_bits_too():
    for p in PARAMS:
        for bits in (2, 4, 6):
            cls = UniformQuantizer if p[0] == "U" else Pow2Quantizer
            q = cls(p, "weight", bits=bits, init="paper")
            assert q.bits == bits


@pytest.mark.parametrize("p", PARAMS)
@pytest.mark.parametrize("scale", [1e-3, 10.0, 1e3])
def test_issue_example_read_plan_shows_requested_bits(p, scale):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        for lin in (m[0], m[2]):
            lin.weight.mul_(scale)
    kind = "uniform" if p[0] == "U" else "pow2"
    st.quantize_(m, st.Uhlich(kind=kind, parametrization=p, w_bits=2, a_bits=2, a_init="float"))
    st.calibrate(m, [(torch.randn(64, 8) * scale,)], num_batches=1)
    assert st.read_plan(m) == {"0": {"w_bits": 2, "a_bits": 2}, "2": {"w_bits": 2, "a_bits": 2}}
