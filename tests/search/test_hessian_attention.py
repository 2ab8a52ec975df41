"""Hutchinson traces through torch's own attention (issue 11, item 4): nn.TransformerEncoder
(batch_first, nn.MultiheadAttention inside) and a direct F.scaled_dot_product_attention call run on
the math kernel, whose double backward exists; the traces equal v.Hv computed by hand with the
math kernel forced and the same Rademacher probes."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import slimtorch as st
from slimtorch.attach import raw_weight
from slimtorch.search.hessian import _rademacher


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


class SDPA(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.head(y.mean(1))


def _by_hand(model, batch, names, seed=0):
    """One Hutchinson sample v.Hv per layer, math kernel forced by hand, probes as the estimator draws them."""
    ws = [raw_weight(model.get_submodule(n)) for n in names]
    gen = torch.Generator().manual_seed(seed)
    vs = [_rademacher(w, gen) for w in ws]
    model.eval()
    with sdpa_kernel([SDPBackend.MATH]):
        loss = F.cross_entropy(model(batch[0]), batch[1])
    g = torch.autograd.grad(loss, ws, create_graph=True)
    hv = torch.autograd.grad(g, ws, grad_outputs=vs)
    return {n: float((v * h).sum()) for n, v, h in zip(names, vs, hv)}


@pytest.mark.parametrize("cls", [Encoder, SDPA])
def test_traces_through_torch_attention_match_math_kernel_by_hand(cls):
    torch.manual_seed(0)
    model = cls()
    batch = (torch.randn(4, 5, 16), torch.randint(0, 3, (4,)))
    r = st.hutchinson_traces(model, [batch], max_iter=1, progress=False)
    assert all(math.isfinite(v) for v in r.traces.values())
    if cls is Encoder:
        assert any("self_attn" in n for n in r.traces)      # the attention projections are traced
    want = _by_hand(model, batch, list(r.totals))
    for n, t in r.totals.items():
        assert t == pytest.approx(want[n], rel=1e-5, abs=1e-9), n


def test_converged_traces_are_finite():
    torch.manual_seed(0)
    model = Encoder()
    batch = (torch.randn(4, 5, 16), torch.randint(0, 3, (4,)))
    r = st.hutchinson_traces(model, [batch], max_iter=30, tol=1e-2, progress=False)
    assert r.iterations >= 2 and all(math.isfinite(v) for v in r.traces.values())
