"""AdaRound (quant/adaround.py) against its equations on tiny problems."""
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.errors import ConfigError
from slimtorch.quant.adaround import (adaround_, beta_at, init_v, rectified_sigmoid, round_regularizer)
from slimtorch.quant.api import weight_quantizer


def test_rectified_sigmoid_inverts_init():
    f = torch.linspace(0.01, 0.99, 50)
    assert torch.allclose(rectified_sigmoid(init_v(f)), f, atol=1e-4)
    assert rectified_sigmoid(torch.tensor([-50.0, 50.0])).tolist() == [0.0, 1.0]   # Eq. 23 clips


def test_regulariser_zero_only_at_binary_h():
    assert round_regularizer(torch.tensor([0.0, 1.0, 1.0]), 2.0).item() == 0.0
    # 1 - |2*0.5 - 1|^b = 1 at h = 0.5
    assert round_regularizer(torch.tensor([0.5]), 20.0).item() == pytest.approx(1.0)


def test_beta_schedule_warmup_then_anneals():
    assert beta_at(0, 100, 0.2, (20.0, 2.0)) is None
    assert beta_at(19, 100, 0.2, (20.0, 2.0)) is None
    assert beta_at(20, 100, 0.2, (20.0, 2.0)) == pytest.approx(20.0)
    assert beta_at(100, 100, 0.2, (20.0, 2.0)) == pytest.approx(2.0)


def _model_and_data(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    data = [torch.randn(64, 16) for _ in range(4)]
    return m, data


def _grid_codes(layer):
    wq = weight_quantizer(layer)
    p = wq.quant_params()
    u = layer.parametrizations.weight.original / p["scale"]
    return u, p


def test_adaround_weights_on_grid_and_rounded_up_or_down():
    m, data = _model_and_data()
    orig = {n: l.weight.detach().clone() for n, l in m.named_children() if isinstance(l, nn.Linear)}
    st.quantize_(m, st.LSQ(w_bits=3, a_bits=None))
    st.calibrate(m, data, rounding="nearest")
    res = adaround_(m, data, iters=60)
    assert set(res.layers) == {"0", "2"}
    for n, layer in m.named_children():
        if not isinstance(layer, nn.Linear):
            continue
        u, p = _grid_codes(layer)
        assert torch.allclose(u, u.round(), atol=1e-4)                       # on the grid
        assert u.round().min() >= p["q_n"] and u.round().max() <= p["q_p"]
        w = orig[n] / p["scale"]
        lo, hi = torch.floor(w).clamp(p["q_n"], p["q_p"]), torch.ceil(w).clamp(p["q_n"], p["q_p"])
        assert bool(((u.round() == lo) | (u.round() == hi)).all())            # only up or down
        # the quantizer reproduces the stored weight exactly: learned rounding survives
        assert torch.allclose(layer.weight, layer.parametrizations.weight.original, atol=1e-6)


def test_adaround_lowers_reconstruction_error_vs_nearest():
    m, data = _model_and_data(1)
    ref = [m(x).detach() for x in data]
    st.quantize_(m, st.LSQ(w_bits=2, a_bits=None))
    st.calibrate(m, data, rounding="nearest")
    nearest = sum(float((m(x) - r).pow(2).mean().detach()) for x, r in zip(data, ref))
    res = adaround_(m, data, iters=300)
    learned = sum(float((m(x) - r).pow(2).mean().detach()) for x, r in zip(data, ref))
    assert learned < 0.9 * nearest, (learned, nearest)
    for it, before, after in res.layers.values():
        assert it == 300 and after <= before


def test_adaround_respects_time_budget():
    m, data = _model_and_data()
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=None))
    st.calibrate(m, data, rounding="nearest")
    res = adaround_(m, data, iters=100000, time_budget_s=0.5)
    assert res.seconds < 10
    assert all(it < 100000 for it, _, _ in res.layers.values())


def test_adaround_bad_input():
    m, data = _model_and_data()
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=8))
    with pytest.raises(ConfigError, match="not calibrated"):
        adaround_(m, data)
    st.calibrate(m, data, rounding="nearest")
    with pytest.raises(ConfigError, match="list or loader"):
        adaround_(m, lambda mm: mm(data[0]))
    with pytest.raises(ConfigError, match="no calibration batches"):
        adaround_(m, [])
    with pytest.raises(ConfigError, match="iters"):
        adaround_(m, data, iters=0)


def test_adaround_skips_wide_layers():
    m, data = _model_and_data()
    st.quantize_(m, st.LSQ(w_bits=8, a_bits=None))
    st.calibrate(m, data, rounding="nearest")
    res = adaround_(m, data, iters=5, max_bits=4)
    assert not res.layers and set(res.skipped) == {"0", "2"}


def test_adaround_redoes_bias_correction_once():
    m, data = _model_and_data(2)
    st.quantize_(m, st.LSQ(w_bits=3, a_bits=None))
    st.calibrate(m, data, rounding="nearest")   # corrects the biases for nearest rounding
    adaround_(m, data, iters=50)
    bias = {n: l.bias.detach().clone() for n, l in m.named_children() if isinstance(l, nn.Linear)}
    st.bias_correct_(m, data)                   # same rounding: measuring again changes nothing
    for n, l in m.named_children():
        if isinstance(l, nn.Linear):
            assert torch.allclose(l.bias, bias[n], atol=1e-6)


def test_adaround_spent_budget_leaves_nearest():
    m, data = _model_and_data()
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=None))
    st.calibrate(m, data, rounding="nearest")
    w = m[2].weight.detach().clone()
    res = adaround_(m, data, iters=10, time_budget_s=1e-9)
    assert res.skipped["2"].startswith("time budget spent") and torch.equal(m[2].weight, w)
