"""st.bias_correct_: the corrected layer's mean output error on the calibration data is ~0 (same
float input, float vs quantized weights); float (unquantized) weights leave outputs unchanged."""
import copy

import pytest
import torch
from torch import nn

import slimtorch as st


def _data(shape, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, *shape, generator=g) + 0.7 for _ in range(n)]   # E[x] != 0: a biased error


@pytest.mark.parametrize("layer, shape", [
    (lambda: nn.Linear(16, 8), (16,)),
    (lambda: nn.Linear(16, 8, bias=False), (5, 16)),
    (lambda: nn.Conv2d(3, 8, 3, padding=1), (3, 9, 9)),
    (lambda: nn.Conv2d(8, 8, 3, stride=2, groups=8, bias=False), (8, 9, 9)),
])
def test_mean_output_error_is_zero_after_correction(layer, shape):
    torch.manual_seed(0)
    ref = layer()
    m = copy.deepcopy(ref)
    st.quantize_(m, st.LSQ(w_bits=3, a_bits=None))
    data = _data(shape)
    st.calibrate(m, data, bias_correction=False, rounding="nearest")
    ch = -1 if isinstance(ref, nn.Linear) else 1

    def mean_err():
        with torch.no_grad():
            e = torch.cat([(ref(x) - m(x)).movedim(ch, -1).reshape(-1, 8) for x in data])
            y = torch.cat([ref(x).reshape(-1) for x in data])
        return e.double().mean(0).abs().max().item(), y.abs().mean().item()

    before, scale = mean_err()
    assert before > 1e-3 * scale                      # 3-bit weights: a visible biased error
    assert st.bias_correct_(m, data) == 1
    after, _ = mean_err()
    assert after < 1e-5 * scale


def test_first_layer_of_a_stack_and_num_batches():
    torch.manual_seed(1)
    ref = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    m = copy.deepcopy(ref)
    st.quantize_(m, st.LSQ(w_bits=3, a_bits=None))
    data = _data((16,), n=8)
    st.calibrate(m, data, bias_correction=False, rounding="nearest")
    assert st.bias_correct_(m, data, num_batches=3) == 2
    with torch.no_grad():
        err = torch.cat([ref[0](x) - m[0](x) for x in data[:3]]).double().mean(0).abs().max().item()
        scale = torch.cat([ref[0](x) for x in data[:3]]).abs().mean().item()
    assert err < 1e-5 * scale


def test_unquantized_weights_change_nothing():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7 * 7, 5))
    data = _data((3, 9, 9))
    before = [model(x) for x in data]
    state = copy.deepcopy(model.state_dict())
    assert st.bias_correct_(model, data) == 0        # no quantizer attached: nothing to correct
    for x, y in zip(data, before):
        assert torch.equal(model(x), y)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_quantized_activations_keep_float_input_and_int32_bias():
    """With input quantizers and an int32 bias the hook still sees the float input (no crash, bias
    moved toward the float mean)."""
    torch.manual_seed(3)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    m = copy.deepcopy(ref)
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=8, bias="int32"))
    data = _data((3, 9, 9))
    st.calibrate(m, data, bias_correction=False, rounding="nearest")
    with torch.no_grad():
        gap = lambda: sum((ref(x) - m(x)).mean((0, 2, 3)).abs().sum().item() for x in data)
        g0 = gap()
        assert st.bias_correct_(m, data) == 2
        assert gap() < g0


def test_calibrate_corrects_by_default_once_and_reads_a_generator_once():
    torch.manual_seed(5)
    ref = nn.Linear(16, 8)
    data = _data((16,), n=6)

    def mean_err(m):
        with torch.no_grad():
            return torch.cat([ref(x) - m(x) for x in data]).double().mean(0).abs().max().item()

    m = copy.deepcopy(ref)
    st.quantize_(m, st.LSQ(w_bits=3, a_bits=8))
    st.calibrate(m, (x for x in data), rounding="nearest")   # one-shot iterator: both passes see the batches
    m2 = copy.deepcopy(ref)
    st.quantize_(m2, st.LSQ(w_bits=3, a_bits=8))
    st.calibrate(m2, data, bias_correction=False, rounding="nearest")
    assert torch.equal(m2.bias, ref.bias)
    assert mean_err(m) < 0.1 * mean_err(m2)     # the weight-rounding shift is gone
    bias = m.bias.detach().clone()
    st.bias_correct_(m, data)                   # a second correction replaces the first
    assert torch.allclose(m.bias, bias, atol=1e-6)


def test_calibrate_does_not_start_a_reiterable_loader_just_to_check_it():
    class Loader:                                  # like a DataLoader: each iter() is a new pass
        def __init__(self, data):
            self.data, self.passes = data, 0

        def __iter__(self):
            self.passes += 1
            return iter(self.data)

    torch.manual_seed(6)
    m = nn.Linear(16, 8)
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=8))
    loader = Loader(_data((16,), n=3))
    st.calibrate(m, loader)
    assert loader.passes == 2                      # one observed pass + one bias-correction pass


def test_unbatched_conv_input_is_corrected_per_output_channel():
    torch.manual_seed(0)
    ref = nn.Conv1d(3, 8, 3)
    m = copy.deepcopy(ref)
    st.quantize_(m, st.LSQ(w_bits=3, a_bits=None))
    data = [torch.randn(3, 20) + 1.0 for _ in range(4)]          # (C, L): Conv1d takes it unbatched
    st.calibrate(m, data, bias_correction=False, rounding="nearest")

    def mean_err():
        with torch.no_grad():
            return torch.cat([ref(x) - m(x) for x in data], 1).double().mean(1).abs().max().item()
    before = mean_err()
    assert before > 1e-4 and st.bias_correct_(m, data) == 1
    assert mean_err() < 1e-6 < before
