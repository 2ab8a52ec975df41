"""Budget module extensions: differentiable weight/activation bytes agree with the packed-file byte
accounting of ``layer_cost`` and with ``trace_layers``; the Table-2 (bias at b bits) variant; model
totals count the persistent buffers (BatchNorm statistics, ...) the file must store."""
import math

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.errors import ConfigError
from slimtorch.quant.uhlich import Uhlich
from slimtorch import cost as B


pytestmark = pytest.mark.usefixtures("one_thread")


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
    # U3 stores two floats per quantizer (d and qmax), as the packed file does (issue 11, item 3)
    assert cost.bytes == math.ceil(1280 * 4 / 8) + 4 * (10 + 2 * 2) and cost.qparams == 4


class _Gain(nn.Module):
    """A persistent float16 buffer (counted at 2 B) and a non-persistent one (not stored, not counted)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("gain", torch.ones(3, dtype=torch.float16))
        self.register_buffer("scratch", torch.zeros(100), persistent=False)

    def forward(self, x):
        return x


def _conv_bn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), _Gain(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def test_model_costs_count_buffers_by_hand(tmp_path):
    m = _conv_bn()
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=4, weights="per_tensor"))
    st.calibrate(m, [torch.randn(4, 1, 8, 8)], bias_correction=False)   # no bias added
    c = B.model_costs(m)
    conv = math.ceil(36 * 4 / 8) + 4 * (0 + 1 + 1)             # codes, no bias, W step + A step
    fc = math.ceil(1440 * 4 / 8) + 4 * (10 + 1 + 1)            # codes, bias, W step + A step
    assert [r.bytes for r in c["layers"]] == [conv, fc] == [26, 768]
    assert c["other_params"] == 8 and c["other_param_bytes"] == 4 * 8    # BN weight + bias
    # running_mean 4 + running_var 4 (float32), num_batches_tracked (int64), gain 3 x float16;
    # quantizer buffers (_bits, _signed, _initialized) and the non-persistent scratch are not counted
    assert c["buffers"] == 4 + 4 + 1 + 3 and c["buffer_bytes"] == 4 * 8 + 8 + 2 * 3 == 46
    assert c["bytes"] == 26 + 768 + 32 + 46 == 872
    assert c["params"] == 36 + 8 + 1440 + 10
    assert c["fp32_bytes"] == 4 * (36 + 8 + 1440 + 10) + 46
    assert B.weight_bytes(m) == 26 + 768                         # Uhlich's S^w: quantizable layers only
    assert st.report(m).totals["bytes"] == 872
    from slimtorch.export import save_packed
    from slimtorch.export.file_report import file_report
    info = save_packed(m, tmp_path / "m.slim")
    t = file_report(tmp_path / "m.slim").totals
    assert info["theoretical_bytes"] == t["theory_bytes"] == 872
    assert t["file_bytes"] - t["header_bytes"] == 872            # the data section is exactly the theory
    assert t["other_file_bytes"] == t["theory_other_bytes"] == 32 + 46


def test_model_costs_shared_and_quantizer_buffers():
    m = _conv_bn()
    m[3].register_buffer("alias", m[1].running_mean)             # the same tensor twice: stored once
    assert B.model_costs(m)["buffer_bytes"] == 46
    assert [n for n, _ in B.state_buffers(m)] == ["1.running_mean", "1.running_var",
                                                  "1.num_batches_tracked", "3.gain"]
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=4))
    assert [n for n, _ in B.state_buffers(m)] == ["1.running_mean", "1.running_var",
                                                  "1.num_batches_tracked", "3.gain"]
    assert B.model_costs(m)["buffer_bytes"] == 46
