"""Quant-Noise transform (pq/noise.py): stored weights never change, block dropping at rate p with
whole blocks and 1/(1-p) rescaling, scalar intN noise straight-through, identity in eval."""
import math

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.attach import raw_weight
from slimtorch.pq import minmax_grid, noise_transform
from slimtorch.quant import fake_quant, weight_quantizer

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = {
    "linear": lambda: nn.Linear(16, 6),
    "conv3x3": lambda: nn.Conv2d(3, 4, 3),
    "conv1x1": lambda: nn.Conv2d(8, 4, 1),
    "conv1d": lambda: nn.Conv1d(2, 4, 3),
    "embedding": lambda: nn.Embedding(10, 16),
}
INPUTS = {"linear": lambda: torch.randn(5, 16), "conv3x3": lambda: torch.randn(2, 3, 6, 6),
          "conv1x1": lambda: torch.randn(2, 8, 4, 4), "conv1d": lambda: torch.randn(2, 2, 7),
          "embedding": lambda: torch.randint(0, 10, (3, 4))}
BLOCKS = {"linear": 8, "conv3x3": 9, "conv1x1": 4, "conv1d": 3, "embedding": 8}   # fairseq's defaults


def _layer(kind, **cfg):
    torch.manual_seed(0)
    m = LAYERS[kind]()
    with torch.no_grad():
        m.weight.copy_(torch.randn_like(m.weight).sign() * (1 + torch.rand_like(m.weight)))   # no zeros
    return st.quant_noise_(nn.Sequential(m), st.QuantNoise(**cfg))[0]


def _blocks(w, bs):
    return w.reshape(w.shape[0], -1, bs)


@pytest.mark.parametrize("mode", ["pq", "scalar"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_stored_weight_is_never_modified(kind, mode):
    m = _layer(kind, p=0.5, mode=mode)
    before = raw_weight(m).detach().clone()
    for _ in range(5):
        m(INPUTS[kind]()).square().sum().backward()
    assert torch.equal(raw_weight(m), before)                     # bit-identical (fairseq: zeroed blocks)
    assert raw_weight(m).grad is not None and not torch.equal(m.weight, before)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_default_blocks_drop_whole_and_rescale(kind):
    m = _layer(kind, p=0.4)
    assert noise_transform(m).block_size == BLOCKS[kind]
    W = raw_weight(m).detach()
    for _ in range(3):
        b = _blocks(m.weight.detach(), BLOCKS[kind])
        dropped = (b == 0).all(-1)
        assert ((b == 0).any(-1) == dropped).all()                # a block drops as a whole ...
        kept = _blocks(W, BLOCKS[kind])[~dropped] / (1 - 0.4)
        torch.testing.assert_close(b[~dropped], kept, rtol=1e-6, atol=0)   # ... the rest is W / (1 - p)


def test_conv_kxk_drops_whole_kernels_and_1x1_runs_along_in_channels():
    m = _layer("conv3x3", p=0.5)
    w = m.weight.detach()                                          # (out, in, 3, 3)
    zero = (w == 0).flatten(2)
    assert (zero.all(-1) == zero.any(-1)).all() and zero.all(-1).any() and (~zero.all(-1)).any()
    m = _layer("conv1x1", p=0.5)
    z = (m.weight.detach()[..., 0, 0] == 0).reshape(4, 2, 4)       # (out, in / 4 blocks, 4 channels)
    assert (z.all(-1) == z.any(-1)).all()


def test_dropped_block_frequency_matches_p():
    """Linear 512 -> 256, block 8: 16,384 Bernoulli(p) blocks per draw; within 4.5 binomial sigmas."""
    torch.manual_seed(1)
    m = st.quant_noise_(nn.Sequential(nn.Linear(512, 256)), st.QuantNoise(p=0.15))[0]
    with torch.no_grad():
        m.parametrizations.weight.original.fill_(1.0)
    n = 256 * 512 // 8
    for _ in range(3):
        dropped = int((_blocks(m.weight.detach(), 8) == 0).all(-1).sum())
        assert abs(dropped - 0.15 * n) < 4.5 * math.sqrt(n * 0.15 * 0.85)


def test_rescaling_keeps_the_expectation():
    """E[W (1 - M) / (1 - p)] = W: the mean of 3,000 draws within 5 standard errors per element."""
    m = _layer("linear", p=0.3)
    W = raw_weight(m).detach()
    with torch.no_grad():
        draws = torch.stack([m.weight for _ in range(3000)])
    se = W.abs() * math.sqrt(0.3 / 0.7) / math.sqrt(3000)
    assert ((draws.mean(0) - W).abs() <= 5 * se).all()
    assert not torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("mode", ["pq", "scalar"])
def test_eval_and_p0_are_identity(mode):
    m = _layer("conv3x3", p=0.5, mode=mode)
    m.eval()
    assert torch.equal(m.weight, raw_weight(m))
    m = _layer("linear", p=0.0, mode=mode)
    assert m.training and torch.equal(m.weight, raw_weight(m))
    x = torch.randn(3, 16)
    assert torch.equal(m(x), nn.functional.linear(x, raw_weight(m), m.bias))


def test_pq_gradient_is_masked_and_rescaled():
    m = _layer("linear", p=0.25)
    G = torch.randn(6, 16)
    W_used = m.weight
    (W_used * G).sum().backward()
    keep = (W_used.detach() != 0).to(G.dtype)                      # W has no zeros: zero = dropped
    torch.testing.assert_close(raw_weight(m).grad, G * keep / 0.75, rtol=1e-6, atol=0)


def test_noise_is_deterministic_under_manual_seed():
    for mode in ("pq", "scalar"):
        m = _layer("conv3x3", p=0.3, mode=mode)
        torch.manual_seed(7)
        a = m.weight.detach()
        torch.manual_seed(7)
        b = m.weight.detach()
        torch.manual_seed(8)
        c = m.weight.detach()
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_scalar_noise_quantizes_a_fraction_p_straight_through():
    """Mode scalar, int4 min-max: about p of the elements become exactly Q(w); the rest stay w;
    dL/dW = dL/dW_used everywhere (no clamp, no rescaling)."""
    torch.manual_seed(0)
    m = st.quant_noise_(nn.Sequential(nn.Linear(256, 64)), st.QuantNoise(p=0.3, mode="scalar", bits=4))[0]
    W = raw_weight(m).detach()
    g = minmax_grid(W, 4)
    Q = fake_quant(W, g["scale"], g["q_n"], g["q_p"])
    assert int(g["q_p"] - g["q_n"]) == 15 and (Q == 0).sum() >= (W == 0).sum()
    W_used = m.weight
    noised = W_used.detach() != W
    assert torch.equal(W_used.detach()[noised], Q[noised])
    n = W.numel()
    assert abs(int(noised.sum()) - 0.3 * n) < 4.5 * math.sqrt(n * 0.3 * 0.7)   # (Q == W is rare at int4)
    G = torch.randn_like(W)
    (W_used * G).sum().backward()
    assert torch.equal(raw_weight(m).grad, G)


def test_scalar_noise_uses_the_layers_own_quantizer_at_its_bits():
    """bits="layer" and a 4-bit LSQ weight quantizer (as a HAWQ plan gives it): the noised elements
    are the quantizer's own fake-quantized values, on its current step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    st.quantize_(model, st.LSQ(w_bits=8, a_bits=None), plan={"0": 4})
    st.quant_noise_(model, st.QuantNoise(p=0.5, mode="scalar", bits="layer"))
    st.calibrate(model, [torch.randn(8, 64)], bias_correction=False)
    for layer, bits in ((model[0], 4), (model[2], 8)):
        wq, t = weight_quantizer(layer), noise_transform(layer)
        assert wq.bits == bits and list(layer.parametrizations.weight) == [t, wq]
        W = raw_weight(layer).detach()
        out = t(W)
        qp = wq.quant_params()
        Q = fake_quant(W, qp["scale"], qp["q_n"], qp["q_p"], qp["offset"])
        noised = out != W
        assert noised.float().mean().item() == pytest.approx(0.5, abs=0.15)
        assert torch.equal(out[noised], Q[noised])
        assert torch.equal(layer.weight.detach(), wq(out).detach())     # W' = Q(noise(W))
    model.train()
    model(torch.randn(3, 64)).sum().backward()


def test_bits_layer_on_a_float_layer_is_no_noise():
    """bits="layer" follows the layer's quantizer: a layer without one is float (32 bits), unchanged."""
    m = _layer("linear", p=0.9, mode="scalar", bits="layer")
    assert m.training and torch.equal(m.weight, raw_weight(m))


def test_bits_layer_noise_attached_before_its_quantizer():
    """quant_noise_ first, quantize_ later (torch evaluates the chain on registration: the noise
    stays quiet then); the noise then finds the quantizer and follows its bits."""
    torch.manual_seed(0)
    model = st.quant_noise_(nn.Sequential(nn.Linear(32, 8)), st.QuantNoise(p=0.5, mode="scalar", bits="layer"))
    torch.manual_seed(5)
    st.quantize_(model, st.LSQ(w_bits=3, a_bits=None, weights="per_tensor"))
    st.calibrate(model, [torch.randn(4, 32)], bias_correction=False)
    model.train()
    assert len({*noise_transform(model[0])(raw_weight(model[0])).detach().unique().tolist()} -
               {*raw_weight(model[0]).detach().unique().tolist()}) <= 8          # new values: the 3-bit grid
    model(torch.randn(2, 32)).sum().backward()
