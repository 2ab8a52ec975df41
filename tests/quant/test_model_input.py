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


def test_training_checkpoint_loads_into_an_uncalibrated_model_and_back(tmp_path):
    from slimtorch.checkpoint import load_checkpoint, save_checkpoint
    x = images()
    m = calibrated(st.LSQPlus(w_bits=8, a_bits=8), x)
    save_checkpoint(tmp_path / "c.ckpt", model=m, optimizer=torch.optim.Adam(m.parameters(), 1e-3))
    fresh = st.quantize_(cnn(), st.LSQPlus(w_bits=8, a_bits=8))
    opt = torch.optim.Adam(fresh.parameters(), 1e-3)           # built before the steps change shape
    load_checkpoint(tmp_path / "c.ckpt", model=fresh, optimizer=opt, restore_rng=False)
    q = input_quantizer(fresh[0])
    assert q.scale.shape == (1, 3, 1, 1) and any(p is q.scale for g in opt.param_groups for p in g["params"])
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))
    old = calibrated(st.LSQPlus(w_bits=8, a_bits=8, model_input="per_tensor"), x)
    save_checkpoint(tmp_path / "t.ckpt", model=old)             # one step (an earlier checkpoint)
    load_checkpoint(tmp_path / "t.ckpt", model=fresh, restore_rng=False)
    with torch.no_grad():
        assert q.scale.numel() == 1 and torch.equal(fresh(x), old(x))


def test_a_failed_load_leaves_the_model_alone(tmp_path):
    from slimtorch.checkpoint import load_checkpoint, save_checkpoint
    from slimtorch.errors import CheckpointError
    x = images()
    m = calibrated(st.LSQPlus(w_bits=8, a_bits=8), x)
    save_checkpoint(tmp_path / "c.ckpt", model=m)
    other = calibrated(st.LSQPlus(w_bits=8, a_bits=8, model_input="per_tensor"), x,
                       nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(),
                                     nn.Linear(144, 6)))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(tmp_path / "c.ckpt", model=other, restore_rng=False)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


@pytest.mark.parametrize("a_init", ["mse_hist", "mse", "lsq", "3sigma", "minmax"])
def test_calibrating_twice_keeps_per_channel_steps(a_init):
    x = images()
    m = calibrated(st.LSQPlus(w_bits=8, a_bits=8, a_init=a_init), x)
    first = input_quantizer(m[0]).scale.detach().clone()
    param, offset = input_quantizer(m[0]).scale, input_quantizer(m[0]).offset
    st.calibrate(m, [x[:8], x[8:]])
    q = input_quantizer(m[0])
    assert q.scale.shape == first.shape == (1, 3, 1, 1)
    assert torch.allclose(q.scale.detach(), first, rtol=1e-3)
    assert q.scale is param and (q.offset is None or q.offset is offset)       # an optimizer keeps them


def test_unbatched_and_foreign_channel_inputs_stay_per_tensor():
    m = calibrated(st.LSQPlus(w_bits=8, a_bits=8), images())
    unbatched = st.quantize_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), st.LSQPlus(w_bits=8, a_bits=8))
    x = images()[0]                                            # (3, 8, 8): conv2d takes it unbatched
    st.calibrate(unbatched, [x])                               # bias correction per channel too
    assert input_quantizer(unbatched[0]).scale.numel() == 1 and unbatched[0](x).shape == (8, 8, 8)
    conv1d = st.quantize_(nn.Sequential(nn.Conv1d(1, 4, 3)), st.LSQPlus(w_bits=8, a_bits=8))
    sig = torch.randn(1, 50)                                   # (C=1, L) unbatched
    st.calibrate(conv1d, [sig])
    assert conv1d(sig).shape == (4, 48)
    assert input_quantizer(m[0]).per_channel_input


@pytest.mark.parametrize("make, shape", [(lambda: nn.Conv1d(2, 3, 3), (6, 2, 20)),
                                         (lambda: nn.Conv2d(4, 4, 3, groups=4), (6, 4, 7, 7))])
def test_conv1d_and_depthwise_inputs(make, shape, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(shape) * torch.linspace(0.5, 4, shape[1]).view(1, -1, *[1] * (len(shape) - 2))
    m = st.quantize_(nn.Sequential(make()), st.LSQPlus(w_bits=8, a_bits=8))
    st.calibrate(m, [x[:3], x[3:]])
    q = input_quantizer(m[0])
    assert q.scale.numel() == shape[1] and q.scale.dim() == len(shape)
    st.save_packed(m, tmp_path / "m.slim")
    loaded = st.load_packed(tmp_path / "m.slim", lambda: nn.Sequential(make()))
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
    st.calibrate(loaded, [x])                                   # the packed spec keeps it per channel
    assert input_quantizer(loaded[0]).scale.numel() == shape[1]
