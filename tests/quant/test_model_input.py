"""Per-channel quantization of the model's own input (quant/model_input.py)."""
import numpy as np
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch import cost as B
from slimtorch.export.file_report import file_report
from slimtorch.attach import input_quantizer
from slimtorch.errors import ConfigError
from slimtorch.quant.fake_quant import fake_quant

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def images(n=16, seed=0, extremes=0):
    """Normalised uint8 images with a 0 and a 255 pixel in every channel (of image ``extremes``),
    the other pixels in 10..245."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(10, 246, (n, 3, 8, 8), generator=g).float()
    p[extremes, :, 0, 0], p[extremes, :, 0, 1] = 0, 255
    return (p / 255 - MEAN) / STD


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(),
                         nn.Linear(144, 5))


def calibrated(cfg, x, model=None):
    m = st.quantize_(model or cnn(), cfg)
    st.calibrate(m, [x[:8], x[8:]])
    return m


@pytest.mark.parametrize("extremes", [0, 15])
def test_first_conv_input_is_the_pixel_grid_and_lossless(extremes):
    x = images(extremes=extremes)                   # in the first or the last calibration batch
    m = calibrated(st.LSQPlus(w_bits=8, a_bits=8), x)
    q = input_quantizer(m[0])
    assert list(q.scale.shape) == [1, 3, 1, 1] and q.spec()["scale_shape"] == [1, 3, 1, 1]
    assert torch.allclose(q.scale.detach().flatten(), (1 / (255 * STD)).flatten(), rtol=1e-4)
    assert (q(x) - x).abs().max() < 1e-5                       # every pixel is a grid point
    per_tensor = input_quantizer(calibrated(st.LSQPlus(w_bits=8, a_bits=8, model_input="per_tensor"), x)[0])
    assert per_tensor.scale.numel() == 1 and (per_tensor(x) - x).abs().max() > 1e-3
    for layer in (m[2], m[4]):                                  # they read activations: per tensor
        assert input_quantizer(layer).scale.numel() == 1


def test_symmetric_lsq_input_is_per_channel_too():
    x = images()
    q = input_quantizer(calibrated(st.LSQ(w_bits=8, a_bits=8), x)[0])
    amax = torch.maximum(x.amin((0, 2, 3)).abs(), x.amax((0, 2, 3)))
    assert q.signed and q.offset is None
    err_minmax = ((fake_quant(x, (amax / q.q_p).view(1, 3, 1, 1), q.q_n, q.q_p) - x) ** 2).mean((0, 2, 3))
    err = ((q(x) - x) ** 2).mean((0, 2, 3))
    assert (err <= err_minmax * 1.01 + 1e-12).all()


def test_low_bits_take_each_channels_lower_error_range():
    x = images(64)
    q = input_quantizer(calibrated(st.LSQPlus(w_bits=4, a_bits=2), x)[0])
    lo, hi = x.amin((0, 2, 3)).view(1, 3, 1, 1), x.amax((0, 2, 3)).view(1, 3, 1, 1)
    s = (hi - lo) / 3
    err_minmax = ((fake_quant(x, s, 0, 3, lo) - x) ** 2).mean((0, 2, 3))
    err = ((q(x) - x) ** 2).mean((0, 2, 3))
    assert (err < err_minmax).all()                 # uniform pixels at 2 bits: clipping beats min-max


def test_a_view_of_the_input_counts_a_computed_tensor_does_not():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.a(x[:, :, 1:]) + self.b(x[:, :, 1:] * 2)
    x = images()
    m = calibrated(st.LSQPlus(w_bits=8, a_bits=8), x, Two())
    assert input_quantizer(m.a).scale.numel() == 3 and input_quantizer(m.b).scale.numel() == 1


def test_linear_first_layer_stays_per_tensor():
    x = torch.randn(32, 5, 6) * torch.tensor([0.1, 1, 10, 100, 1, 1])
    m = st.quantize_(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), st.LSQPlus(w_bits=8, a_bits=8))
    st.calibrate(m, [x])
    assert input_quantizer(m[0]).scale.numel() == 1          # integer kernels take one input scale


def test_minmax_init_keeps_every_channels_min_max():
    x = torch.randn(16, 3, 8, 8) * torch.tensor([0.5, 1.0, 4.0]).view(1, 3, 1, 1)
    q = input_quantizer(calibrated(st.LSQPlus(w_bits=8, a_bits=8, a_init="minmax"), x)[0])
    lo, hi = x.amin((0, 2, 3)), x.amax((0, 2, 3))
    assert torch.allclose(q.scale.detach().flatten(), (hi - lo) / 255, rtol=1e-5)
    assert torch.allclose(q.offset.detach().flatten(), lo, atol=1e-6)


@pytest.mark.parametrize("cfg", [st.LSQPlus(w_bits=8, a_bits=8, integer_offset=True),
                                 st.LSQPlus(w_bits=8, a_bits=8, bias="int32")])
def test_integer_kernel_configs_keep_one_input_scale(cfg):
    assert input_quantizer(calibrated(cfg, images())[0]).scale.numel() == 1


def test_bad_model_input_value_is_named():
    with pytest.raises(ConfigError, match="model_input"):
        st.LSQPlus(model_input="per_pixel")


def test_checkpoint_packed_file_and_onnx_keep_the_per_channel_input(tmp_path):
    x = images()
    m = calibrated(st.LSQPlus(w_bits=8, a_bits=8), x)
    fresh = st.quantize_(cnn(), st.LSQPlus(w_bits=8, a_bits=8))
    fresh.load_state_dict(m.state_dict())                     # a per-tensor quantizer takes the shape
    with torch.no_grad():
        want = m(x)
        assert torch.equal(fresh(x), want)
    rows = {r["name"]: r for r in file_report(st.save_packed(m, tmp_path / "m.slim")["path"]).rows}
    with torch.no_grad():
        assert torch.equal(st.load_packed(tmp_path / "m.slim", cnn)(x), want)
    cost = B.layer_cost("0", m[0])                              # 6 input floats: 3 steps, 3 offsets
    assert rows["0"]["file_bytes"] == cost.bytes and cost.qparams == 8 + 6
    ort = pytest.importorskip("onnxruntime")
    path = st.export_onnx(m, tmp_path / "m.onnx", (x[:2],), exact=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - want.numpy()).max() <= 1e-4 * np.abs(want.numpy()).max()
