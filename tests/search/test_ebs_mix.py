"""EBS mixture (search/ebs_mix.py): forward and every gradient equal the explicit softmax-weighted sum
of fake-quant candidates (whose gradients are the tested LSQ formulas); memory is one weight copy."""
import pytest
import torch
from torch import nn

from slimtorch.quant.fake_quant import fake_quant
from slimtorch.quant.quantizer import LSQQuantizer
from slimtorch.search.ebs_mix import BitMixer, mixed_fake_quant


def _candidates(x, bits, role, **kw):
    qs = [LSQQuantizer(b, role, **kw) for b in bits]
    for q in qs:
        q.initialize(x.detach())
    return qs


def _explicit(x, p, qs):
    out = 0
    for b, q in enumerate(qs):
        n = x.numel() / q.scale.numel() / (x.shape[0] if q.role == "activation" else 1)
        g = 1.0 / (max(n, 1.0) * q.q_p) ** 0.5
        out = out + p[b] * fake_quant(x, q.scale, q.q_n, q.q_p, q.offset, g)
    return out


@pytest.mark.parametrize("role,kw", [("weight", dict(signed=True, scale_shape=(6, 1), init="mse")),
                                     ("activation", dict(signed=False, learn_offset=True, init="minmax"))])
def test_mixture_forward_and_gradients_match_explicit_sum(role, kw):
    torch.manual_seed(0)
    x0 = torch.randn(6, 10) * 2
    qs = _candidates(x0, (2, 3, 8), role, **kw)
    alpha = torch.randn(3, requires_grad=True)
    gout = torch.randn(6, 10)
    grads = []
    for fn in (lambda x, p: mixed_fake_quant(x, p, qs), lambda x, p: _explicit(x, p, qs)):
        x = x0.clone().requires_grad_(True)
        for q in qs:
            q.zero_grad()
        alpha.grad = None
        y = fn(x, torch.softmax(alpha, 0))
        (y * gout).sum().backward()
        grads.append([y.detach(), x.grad, alpha.grad] + [q.scale.grad.clone() for q in qs]
                     + [q.offset.grad.clone() for q in qs if q.offset is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_probability_gradient_is_the_candidates_quantization():
    """d x_hat / d p_b = Q_b(x) (hand formula), so d<g, x_hat>/d p_b = <g, Q_b(x)>."""
    x = torch.randn(4, 8)
    qs = _candidates(x, (2, 4), "weight", signed=True)
    p = torch.tensor([0.3, 0.7], requires_grad=True)
    g = torch.randn(4, 8)
    (mixed_fake_quant(x, p, qs) * g).sum().backward()
    want = torch.stack([(g * q(x)).sum() for q in qs]).detach()
    torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-5)


def _saved_bytes(fn):
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


def test_search_memory_is_one_weight_copy_not_one_per_candidate():
    """The autograd graph of the mixture keeps x and the step sizes only (recomputed backward); the
    explicit sum keeps clamp state, levels and masks for every candidate (DNAS-like growth with |B|)."""
    w = torch.randn(64, 256, requires_grad=True)
    wbytes = w.numel() * 4
    mixer = BitMixer((2, 4, 8), lambda b: LSQQuantizer(b, "weight", signed=True), "weight")
    mixer(w.detach())                                           # initialise the candidates
    ours = _saved_bytes(lambda: mixer(w))
    naive = _saved_bytes(lambda: _explicit(w, mixer.probs(), list(mixer.candidates)))
    assert ours <= 1.05 * wbytes
    assert naive >= 3 * wbytes


def test_mixer_tied_strengths_and_argmax_bits():
    w = BitMixer((2, 4), lambda b: LSQQuantizer(b, "weight"), "weight")
    a = BitMixer((2, 4), lambda b: LSQQuantizer(b, "activation", signed=False), "activation", shared=w)
    assert a.strength is w.strength
    with torch.no_grad():
        w.strength.copy_(torch.tensor([0.0, 1.0]))
    assert w.bits == a.bits == 4
    with pytest.raises(Exception, match="same candidate bits"):
        BitMixer((2, 8), lambda b: LSQQuantizer(b, "activation", signed=False), "activation", shared=w)
    torch.testing.assert_close(w.probs(), torch.softmax(torch.tensor([0.0, 1.0]), 0))


def test_mixer_is_identity_pass_through_while_observing():
    m = BitMixer((2, 4), lambda b: LSQQuantizer(b, "activation", signed=None, init="minmax"), "activation")
    m.start_observing()
    x = torch.randn(3, 5)
    assert torch.equal(m(x), x)
    assert m.has_observed()
    m.finish_observing()
    assert m.initialized and not m.observing
    lin = nn.Linear(5, 2)
    assert m(x).shape == x.shape and lin(m(x)).shape == (3, 2)
