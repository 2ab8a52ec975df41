"""load_packed(runtime="int8"): Linear layers on torch._int_mm match the fake-quant model to float
rounding; layers that do not fit the integer path stay on the float path."""
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.export import load_packed, save_packed
from slimtorch.runtime.int8 import Int8Linear


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 16), nn.GELU(), nn.Conv1d(1, 2, 3),
                         nn.Flatten(), nn.Linear(28, 5))


CFGS = {"w8a8": st.LSQ(w_bits=8, a_bits=8), "w4a8-pc": st.LSQ(w_bits=4, a_bits=8, weights="per_channel"),
        "lsq+w8a8": st.LSQPlus(w_bits=8, a_bits=8, a_init="minmax"), "w3a5": st.LSQ(w_bits=3, a_bits=5)}


@pytest.mark.parametrize("name", sorted(CFGS))
def test_int8_parity(name, tmp_path):
    m = net()
    st.quantize_(m, CFGS[name])
    x = torch.randn(64, 1, 24) * 2
    st.calibrate(m, [x])
    with torch.no_grad():
        want = m.eval()(x)
    save_packed(m, tmp_path / "m.slim")
    got_m = load_packed(tmp_path / "m.slim", net, runtime="int8")
    assert [type(got_m[i]).__name__ for i in (0, 2, 4, 6)] == ["Int8Linear", "Int8Linear", "Conv1d", "Int8Linear"]
    with torch.no_grad():
        got = got_m(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_unsigned_8bit_inputs_use_the_shift():
    layer = Int8Linear(torch.randint(-128, 128, (3, 4)), torch.tensor([0.01]), None, 0.1, None, 0, 255)
    x = torch.rand(5, 4) * 25
    q = torch.clamp(torch.round(x / 0.1), 0, 255) * 0.1
    want = q @ (layer.w_int.float() * 0.01).t()
    assert layer.shift == 128
    assert torch.allclose(layer(x), want, rtol=1e-6, atol=1e-5)
