"""Binary decomposition (runtime/binary_decomp.py): exact integer products at every (b_w, b_a) in
{1..4}^2, signed and unsigned; a quantized Linear's output through bit planes; the binary op count."""
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.errors import ConfigError
from slimtorch.runtime.binary_decomp import binary_linear, binary_matmul, bit_planes, pack_rows


def _ints(bits, signed, shape, g):
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return torch.randint(lo, hi + 1, shape, generator=g)


@pytest.mark.parametrize("bw", [1, 2, 3, 4])
@pytest.mark.parametrize("ba", [1, 2, 3, 4])
@pytest.mark.parametrize("sw,sa", [(True, True), (True, False), (False, True), (False, False)])
def test_decomposed_product_equals_integer_product_exactly(bw, ba, sw, sa):
    g = torch.Generator().manual_seed(bw * 100 + ba * 10 + 2 * sw + sa)
    w, x = _ints(bw, sw, (9, 45), g), _ints(ba, sa, (7, 45), g)
    out, ops = binary_matmul(w, x, bw, ba, sw, sa)
    assert out.dtype == torch.int64 and torch.equal(out, w @ x.T)
    assert ops.bit_ops == bw * ba * 9 * 7 * 45 and ops.int_macs == 9 * 7 * 45
    assert ops.expansion == bw * ba                      # 2-bit x 2-bit: 4x the elements (seed note)


def test_bit_planes_reconstruct_and_reject_out_of_range():
    x = torch.tensor([-4, -1, 0, 3])
    planes, coef = bit_planes(x, 3, signed=True)
    assert coef == [1, 2, -4]
    assert torch.equal(sum(c * planes[i].long() for i, c in enumerate(coef)), x)
    assert torch.equal(pack_rows(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0, 1]])), torch.tensor([[1, 1]], dtype=torch.uint8))
    with pytest.raises(ConfigError, match="do not fit 2-bit signed"):
        bit_planes(x, 2, signed=True)
    with pytest.raises(ConfigError, match="expected a"):
        binary_matmul(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), 2, 2)


@pytest.mark.parametrize("quant", [st.LSQPlus(w_bits=3, a_bits=2), st.LSQ(w_bits=4, a_bits=4),
                                   st.LSQPlus(w_bits=2, a_bits=4, weights="per_tensor")])
def test_quantized_linear_through_bit_planes_matches_fake_quant(quant):
    torch.manual_seed(0)
    lin = nn.Linear(24, 5)
    st.quantize_(lin, quant)
    x = torch.randn(6, 24)
    st.calibrate(lin, [x], bias_correction=False)
    y, ops = binary_linear(lin, x)
    with torch.no_grad():
        torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-5)
    assert ops.bit_ops == quant.w_bits * quant.a_bits * 6 * 5 * 24
    with pytest.raises(ConfigError, match="weight and input quantizers"):
        binary_linear(nn.Linear(3, 2), torch.randn(1, 3))
