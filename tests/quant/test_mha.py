"""nn.MultiheadAttention split into projection Linears: exactly torch's outputs, every projection's
weight and input quantized, and torch's fast path never taken."""
import copy
import itertools

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.attach import input_quantizer
from slimtorch.quant.api import weight_quantizer
from slimtorch.quant.mha import PROJ, is_split, split_projections_

E, H, N, L, S = 8, 2, 3, 5, 4


def _inputs(bf, kdim, g):
    q = torch.randn((N, L, E) if bf else (L, N, E), generator=g)
    k = torch.randn((N, S, kdim or E) if bf else (S, N, kdim or E), generator=g)
    return q, k


def _masks(g):
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0, -1] = True
    return [{}, {"key_padding_mask": kpm}, {"attn_mask": torch.randn(L, S, generator=g)},
            {"key_padding_mask": kpm, "attn_mask": torch.rand(L, S, generator=g) > 0.7},
            {"attn_mask": torch.randn(N * H, L, S, generator=g)}]


def _close(a, b):
    assert (a[0] - b[0]).abs().max() < 1e-6
    assert (a[1] is None) == (b[1] is None)
    if a[1] is not None:
        assert (a[1] - b[1]).abs().max() < 1e-6


@pytest.mark.parametrize("bf,kdim,bias,extra", list(itertools.product(
    (False, True), (None, 6), (True, False), ({}, {"add_bias_kv": True, "add_zero_attn": True}))))
def test_split_equals_torch(bf, kdim, bias, extra):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ref = nn.MultiheadAttention(E, H, batch_first=bf, kdim=kdim, vdim=kdim, bias=bias, **extra).eval()
    mha = split_projections_(copy.deepcopy(ref))
    assert is_split(mha) and isinstance(mha, nn.MultiheadAttention)
    q, k = _inputs(bf, kdim, g)
    for nw, avg, masks in itertools.product((True, False), (True, False), _masks(g)):
        _close(ref(q, k, k, need_weights=nw, average_attn_weights=avg, **masks),
               mha(q, k, k, need_weights=nw, average_attn_weights=avg, **masks))
    if kdim is None:    # self-attention, unbatched, and torch's native fast path (eval, no grad)
        _close(ref(q, q, q), mha(q, q, q))
        _close(ref(q[0], q[0], q[0]), mha(q[0], q[0], q[0]))
        with torch.no_grad():
            _close(ref(q, q, q, need_weights=False), mha(q, q, q, need_weights=False))
    assert mha.in_proj_weight is None if kdim else torch.equal(mha.in_proj_weight, ref.in_proj_weight)


def test_causal_mask_and_training_dropout_free():
    ref = nn.MultiheadAttention(E, H, batch_first=True)
    mha = split_projections_(copy.deepcopy(ref))
    x = torch.randn(N, L, E)
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    _close(ref(x, x, x, attn_mask=mask, is_causal=True, need_weights=False),
           mha(x, x, x, attn_mask=mask, is_causal=True, need_weights=False))


def _observe_all(model):
    """Quantizers in observing mode pass data through: the quantized model at identity."""
    for q in model.modules():
        if isinstance(q, st.quant.Quantizer):
            q.start_observing()


@pytest.mark.parametrize("bf,kdim", [(True, None), (False, None), (True, 6)])
def test_quantize_attaches_every_projection(bf, kdim):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, batch_first=bf, kdim=kdim, vdim=kdim)
    mha = copy.deepcopy(ref)
    st.quantize_(mha, st.LSQPlus(w_bits=4, a_bits=4))
    for p in (*PROJ, "out_proj"):
        m = getattr(mha, p)
        assert weight_quantizer(m) is not None and input_quantizer(m) is not None, p
    q, k = _inputs(bf, kdim, torch.Generator().manual_seed(2))
    _observe_all(mha)
    _close(ref(q, k, k), mha(q, k, k))                     # quantizers at identity: torch's MHA
    assert st.calibrate(mha, lambda m: m(q, k, k)) == 4    # every input quantizer saw data
    out = mha(q, k, k)[0]
    assert (out - ref(q, k, k)[0]).abs().max() > 1e-4      # ... and quantization now acts
    assert [r["name"] for r in st.report(mha).rows] == [*PROJ, "out_proj"]
    assert all(r["w_bits"] == 4 and r["a_bits"] == 4 for r in st.report(mha).rows)


def test_out_proj_input_quantizer_runs_on_attention_output():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    st.quantize_(mha, st.LSQ(w_bits=8, a_bits=8))
    seen = []
    aq = input_quantizer(mha.out_proj)
    aq.register_forward_hook(lambda mod, a, out: seen.append(a[0].shape))
    x = torch.randn(N, L, E)
    mha(x, x, x)
    assert seen == [(N, L, E)]


def test_exclude_keeps_mha_unsplit_and_reported():
    model = nn.Sequential(nn.MultiheadAttention(E, H), nn.Linear(E, 2))
    with pytest.warns(UserWarning, match=r"0 \(MultiheadAttention\).*in_proj_weight"):
        st.quantize_(model, st.LSQ(), exclude=["0.*"])
    assert not is_split(model[0])
    assert "stays float: 0 (MultiheadAttention)" in str(st.report(model))


def test_plan_and_globs_name_projections():
    mha = nn.MultiheadAttention(E, H)
    st.quantize_(mha, st.LSQ(w_bits=4, a_bits=4), plan={"k_proj": 8}, exclude=["v_proj"])
    assert weight_quantizer(mha.k_proj).bits == 8 and weight_quantizer(mha.q_proj).bits == 4
    assert weight_quantizer(mha.v_proj) is None and input_quantizer(mha.v_proj) is None


def test_share_input_quantizers_groups_self_attention_projections():
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    st.quantize_(mha, st.LSQ(w_bits=4, a_bits=4))
    x = torch.randn(N, L, E)
    assert st.share_input_quantizers(mha, lambda m: m(x, x, x)) == [list(PROJ)]
    assert st.calibrate(mha, lambda m: m(x, x, x)) == 2
