"""Quant-Noise stacks with pruning masks and quantizers on one layer, in any attach order:
W' = Q(noise(W * M)); it costs nothing, and save_packed / load_packed ignore it (identity in eval)."""
import itertools

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.attach import raw_weight
from slimtorch.cost import model_costs, weight_mask
from slimtorch.pq import noise_transform, noisy_layers
from slimtorch.quant import weight_quantizer

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = {"prune": lambda m: st.prune_(m, st.Magnitude(remaining=0.5)),
         "quantize": lambda m: st.quantize_(m, st.LSQ(w_bits=4, a_bits=8)),
         "noise": lambda m: st.quant_noise_(m, st.QuantNoise(p=0.5))}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8))


def _data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 2, 6, 6, generator=g) for _ in range(2)]


@pytest.mark.parametrize("order", list(itertools.permutations(STEPS)))
def test_chain_is_q_of_noise_of_w_times_m_in_any_order(order):
    model = _net()
    for step in order:
        STEPS[step](model)
    st.calibrate(model, _data(), bias_correction=False)
    for m in (model[0], model[3]):
        mk, t, wq = weight_mask(m), noise_transform(m), weight_quantizer(m)
        assert list(m.parametrizations.weight) == [mk, t, wq]          # mask -> noise -> quantizer
    model.train()
    model(_data()[0]).sum().backward()                                # a noisy training step runs
    m = model[3]
    W, M = raw_weight(m).detach(), weight_mask(m).mask_for(raw_weight(m)).float()
    torch.manual_seed(3)
    noisy = m.weight.detach()
    torch.manual_seed(3)
    torch.testing.assert_close(noisy, wq(noise_transform(m)(W * M)).detach(), rtol=0, atol=0)
    assert (noisy[M == 0] == 0).all()                                 # pruned weights stay 0
    model.eval()
    torch.testing.assert_close(m.weight, wq(W * M), rtol=0, atol=0)   # eval: the noise is not there


def test_scalar_noise_keeps_pruned_weights_at_zero():
    model = _net()
    st.prune_(model, st.Magnitude(remaining=0.3))
    st.quant_noise_(model, st.QuantNoise(p=0.9, mode="scalar", bits=3))
    W, M = raw_weight(model[3]).detach(), weight_mask(model[3]).mask_for(raw_weight(model[3]))
    w = model[3].weight.detach()
    assert (w[~M] == 0).all() and (w[M] != W[M]).any()               # 0 is on the min-max grid


def test_noise_costs_nothing():
    model = _net()
    st.prune_(model, st.Magnitude(remaining=0.5))
    st.quantize_(model, st.LSQ(w_bits=4, a_bits=8))
    st.calibrate(model, _data(), bias_correction=False)
    before = model_costs(model)
    st.quant_noise_(model, st.QuantNoise(p=0.2))
    after = model_costs(model)
    assert {k: v for k, v in after.items() if k != "layers"} == {k: v for k, v in before.items() if k != "layers"}
    assert [r.as_dict() for r in after["layers"]] == [r.as_dict() for r in before["layers"]]
    assert st.report(model).totals["bytes"] == before["bytes"]


def test_save_packed_ignores_noise_even_in_training_mode(tmp_path):
    """A quantized + pruned layer and a float layer, both with noise still attached, model in train
    mode: the file holds the eval-mode model, and the noise transforms keep their mode."""
    model = _net()
    st.prune_(model, st.Magnitude(remaining=0.5), include="3")
    st.quantize_(model, st.LSQ(w_bits=4, a_bits=8), include="3")
    st.calibrate(model, _data(), bias_correction=False)
    st.quant_noise_(model, st.QuantNoise(p=0.5))
    model.train()
    st.save_packed(model, tmp_path / "m.slim")
    assert all(t.training for *_, t in noisy_layers(model))
    loaded = st.load_packed(tmp_path / "m.slim", _net)
    model.eval()
    x = _data()[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)
    assert not list(noisy_layers(loaded))
