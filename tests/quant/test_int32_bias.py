"""Int32 bias (quant/bias.py): b_hat = round(b / (s_x s_w)) * s_x s_w, straight-through gradient,
follows the layer's quantizers, survives deepcopy and the packed format, and makes onnxruntime's
fused integer kernels (which add an int32 bias) agree with the PyTorch model."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import slimtorch as st

from slimtorch.errors import ConfigError
from slimtorch.quant.bias import Int32Bias

from logit_compare import decided_argmax_agree


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 5))


def _quantized(cfg, x):
    m = _cnn()
    st.quantize_(m, cfg)
    st.calibrate(m, [x])
    return m.eval()


def test_formula_per_channel_and_straight_through_gradient():
    x = torch.randn(32, 1, 8, 8)
    m = _quantized(st.LSQ(w_bits=4, a_bits=8, weights="per_channel", bias="int32"), x)
    conv = m[0]
    s = conv.input_quantizer.quant_params()["scale"].reshape(()) * \
        conv.parametrizations.weight[0].quant_params()["scale"].reshape(-1)
    raw = conv.parametrizations.bias.original
    assert torch.equal(conv.bias, torch.round(raw / s) * s)
    assert not torch.equal(conv.bias, raw)
    conv.bias.sum().backward()
    assert torch.equal(raw.grad, torch.ones_like(raw))


def test_passes_through_before_calibration_and_while_observing():
    m = _cnn()
    st.quantize_(m, st.LSQ(bias="int32"))
    assert torch.equal(m[0].bias, m[0].parametrizations.bias.original)   # nothing initialised yet
    m[0].input_quantizer.start_observing()
    assert m[0].parametrizations.bias[0].step() is None
    with pytest.raises(ConfigError, match="bias="):
        st.LSQ(bias="int8")


def test_deepcopy_follows_the_copy():
    m = _quantized(st.LSQ(w_bits=4, a_bits=4, bias="int32"), torch.randn(8, 1, 8, 8))
    c = copy.deepcopy(m)
    t = c[3].parametrizations.bias[0]
    assert isinstance(t, Int32Bias) and t.__dict__["_owner"] is c[3]
    with torch.no_grad():
        c[3].input_quantizer.scale.mul_(2)
    assert not torch.equal(c[3].bias, m[3].bias)
    assert not any("owner" in k for k in m.state_dict())


def test_budget_counts_the_bias_once():
    m = _quantized(st.LSQ(w_bits=4, a_bits=4, bias="int32"), torch.randn(8, 1, 8, 8))
    ref = _quantized(st.LSQ(w_bits=4, a_bits=4), torch.randn(8, 1, 8, 8))
    assert st.cost.model_costs(m)["bytes"] == st.cost.model_costs(ref)["bytes"]


def test_packed_roundtrip(tmp_path):
    from slimtorch.export import load_packed, save_packed
    x = torch.randn(16, 1, 8, 8)
    m = _quantized(st.LSQPlus(w_bits=3, a_bits=5, bias="int32", integer_offset=True), x)
    save_packed(m, tmp_path / "m.slim")
    with torch.no_grad():
        want = m(x)
        for runtime in ("float", "fakequant"):
            assert torch.equal(load_packed(tmp_path / "m.slim", _cnn, runtime=runtime)(x), want)
    fq = load_packed(tmp_path / "m.slim", _cnn, runtime="fakequant")
    assert isinstance(fq[0].parametrizations.bias[0], Int32Bias)


@pytest.mark.parametrize("bits", [8, 4])
def test_onnxruntime_integer_kernels_agree(bits, tmp_path):
    pytest.importorskip("onnxruntime")
    from slimtorch.export.onnx_export import export_onnx, ort_session
    torch.manual_seed(1)
    x = torch.randn(512, 1, 8, 8)
    m = _quantized(st.LSQ(w_bits=bits, a_bits=bits, bias="int32", weights="per_tensor", w_init="lsq", a_init="lsq"), x[:64])
    path = export_onnx(m, tmp_path / "m.onnx", (x[:2],), input_names=["x"])
    got = ort_session(path).run(None, {"x": x.numpy()})[0]     # fused QLinearConv / QGemm
    with torch.no_grad():
        want = m(x).numpy()
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    agree, checked = decided_argmax_agree(got, want)    # low-bit logits can tie: skip those rows
    assert agree and checked >= len(x) // 2


def test_decided_argmax_skips_ties():
    want = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [3.0, 0.0, 2.999]])
    got = np.array([[0.999, 1.001, 0.0], [0.0, 2.001, 1.0], [2.999, 0.0, 3.0]])
    assert decided_argmax_agree(got, want) == (True, 1)          # rows 0 and 2 are (near) ties
    assert decided_argmax_agree(got, want, tol=0) == (False, 2)  # row 2 flips: a near tie
    assert decided_argmax_agree(want, want) == (True, 2)         # exact tie in row 0 never checked


def test_export_warns_about_biases_integer_kernels_would_round(tmp_path):
    pytest.importorskip("onnxruntime")
    import warnings
    from slimtorch.export.onnx_export import export_onnx
    x = torch.randn(16, 1, 8, 8)
    with pytest.warns(UserWarning, match=r"layer\(s\) \(0, 3, 6\).*bias='int32'"):
        export_onnx(_quantized(st.LSQ(w_bits=8, a_bits=8), x), tmp_path / "a.onnx", (x[:2],))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_onnx(_quantized(st.LSQ(w_bits=8, a_bits=8, bias="int32"), x), tmp_path / "b.onnx", (x[:2],))
        export_onnx(_quantized(st.LSQ(w_bits=8, a_bits=8), x), tmp_path / "c.onnx", (x[:2],), exact=True)
