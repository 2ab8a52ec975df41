"""Budget module extensions: differentiable weight/activation bytes agree with the packed-file byte
accounting of ``layer_cost`` and with ``trace_layers``; the Table-2 (bias at b bits) variant."""
import math

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.errors import ConfigError
from slimtorch.quant.uhlich import Uhlich
from slimtorch.search import budget as B


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3, bias=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


X = torch.randn(3, 1, 8, 8)


@pytest.mark.parametrize("cfg", [None, st.LSQ(w_bits=3, a_bits=4), Uhlich(), Uhlich(kind="pow2", w_bits=3)])
def test_weight_bytes_match_layer_costs(cfg):
    m = _net()
    if cfg is not None:
        st.quantize_(m, cfg)
    m(X)
    want = sum(r.bytes for r in B.layer_costs(m))
    assert B.weight_bytes(m) == want
    t = B.weight_bytes_tensor(m)
    assert t.dtype == torch.float64 and float(t.detach()) == want
    assert t.requires_grad == isinstance(cfg, Uhlich)


def test_bias_bits_variant_is_table2():
    m = _net()
    st.quantize_(m, Uhlich(w_bits=3))
    bits = [m[i].parametrizations.weight[0].bits for i in (0, 2, 5)]
    want = (math.ceil((6 * 9 + 6) * bits[0] / 8) + math.ceil(8 * 6 * 9 * bits[1] / 8)
            + math.ceil((128 * 10 + 10) * bits[2] / 8))
    assert B.weight_bytes(m, bias_bits=True) == want


def test_activation_costs_from_trace_and_from_last_forward():
    m = _net()
    st.quantize_(m, Uhlich(a_bits=4))
    shapes = B.trace_layers(m, X)
    via_trace = B.activation_costs(m, X)
    per = {n: math.ceil(shapes[n].in_numel * m.get_submodule(n).input_quantizer.bits / 8) for n in shapes}
    assert via_trace["layers"] == per
    assert via_trace["sum"] == sum(per.values()) and via_trace["max"] == max(per.values())
    assert per["0"] == math.ceil(64 * 4 / 8) and per["2"] == math.ceil(6 * 36 * 4 / 8)
    m(X)   # quantizers record their per-sample input size
    assert B.activation_costs(m) == via_trace
    sizes = B.activation_bytes_tensors(m)
    assert all(t.requires_grad for t in sizes.values())


def test_activation_size_unknown_before_forward_is_a_clear_error():
    m = _net()
    st.quantize_(m, Uhlich())
    with pytest.raises(ConfigError, match="forward pass"):
        B.activation_bytes_tensors(m)


def test_float_inputs_are_not_counted_and_fixed_bits_are_constants():
    m = _net()
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=None))
    assert B.activation_costs(m, X)["layers"] == {}
    m = _net()
    assert B.weight_bytes(m) == 4 * sum(p.numel() for p in m.parameters())


def test_existing_functions_unchanged():
    m = _net()
    st.quantize_(m, Uhlich(w_bits=4, a_bits=4))
    shapes = B.trace_layers(m, X)
    assert shapes["0"].in_numel == 64 and shapes["0"].macs == 6 * 36 * 9
    bits = {n: (4, 4) for n in shapes}
    assert B.bitops(shapes, bits) == sum(s.macs for s in shapes.values()) * 16
    cost = B.layer_cost("5", m[5])
    assert cost.bytes == math.ceil(1280 * 4 / 8) + 4 * (10 + 2) and cost.qparams == 2
