"""nn.TransformerEncoderLayer / TransformerEncoder / TransformerDecoderLayer quantized in train and
eval mode with torch's fast paths on and off: every input quantizer sees data and torch's fused
kernels (which would bypass the quantizers) never run."""
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.attach import input_quantizer
from slimtorch.quant.api import quantized_layers

D = 16


def _encoder(bf, stacked):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 2, 32, dropout=0.0, batch_first=bf)
    return nn.TransformerEncoder(layer, 2) if stacked else layer


@pytest.fixture
def spy(monkeypatch):
    """Record calls of torch's fused transformer kernels."""
    calls = []
    for name in ("_transformer_encoder_layer_fwd", "_native_multi_head_attention"):
        orig = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k))
    yield calls
    torch.backends.mha.set_fastpath_enabled(True)


def test_spy_sees_torch_fast_path_on_a_float_encoder(spy):
    """The check below is meaningful: a float encoder in eval / no-grad does take the fast path."""
    model = _encoder(True, True).eval()
    with torch.no_grad():
        model(torch.randn(2, 5, D))
    assert "_transformer_encoder_layer_fwd" in spy


@pytest.mark.parametrize("bf", [True, False])
@pytest.mark.parametrize("stacked", [True, False])
def test_encoder_quantized_in_every_mode(bf, stacked, spy):
    model = _encoder(bf, stacked)
    x = torch.randn((4, 7, D) if bf else (7, 4, D))
    kpm = torch.zeros(4, 7, dtype=torch.bool)
    kpm[:, -2:] = True        # padding: TransformerEncoder would convert to nested tensors
    st.quantize_(model, st.LSQPlus(w_bits=4, a_bits=4))
    n_layers = 2 if stacked else 1
    # per layer: q/k/v share one input quantizer (self-attention), out_proj, linear1, linear2
    assert st.calibrate(model, lambda m: m(x, src_key_padding_mask=kpm)) == 4 * n_layers
    assert len(list(quantized_layers(model))) == 6 * n_layers
    outs = []
    for fast in (True, False):
        torch.backends.mha.set_fastpath_enabled(fast)
        model.eval()
        with torch.no_grad():
            outs.append(model(x, src_key_padding_mask=kpm))
        model.train()
        outs.append(model(x, src_key_padding_mask=kpm).detach())
    assert spy == []
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=1e-6)


def test_quantized_output_differs_from_float_in_eval_fast_path():
    """A silently skipped quantizer would give the float output."""
    model = _encoder(True, True).eval()
    x = torch.randn(4, 7, D)
    with torch.no_grad():
        ref = model(x)
    st.quantize_(model, st.LSQ(w_bits=2, a_bits=2))
    st.calibrate(model, [x])
    with torch.no_grad():
        assert (model(x) - ref).abs().max() > 1e-2


def test_weight_only_quantization_still_blocks_fast_path(spy):
    model = _encoder(True, False).eval()
    st.quantize_(model, st.LSQ(w_bits=4, a_bits=None))
    with torch.no_grad():
        model(torch.randn(2, 5, D))
    assert spy == []


def test_self_attention_inputs_share_one_quantizer():
    model = _encoder(True, False)
    st.quantize_(model, st.LSQ(w_bits=4, a_bits=4))
    sa = model.self_attn
    assert input_quantizer(sa.q_proj) is input_quantizer(sa.k_proj) is input_quantizer(sa.v_proj)
    assert input_quantizer(sa.out_proj) is not input_quantizer(sa.q_proj)


def test_decoder_layer_cross_attention():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(D, 2, 32, dropout=0.0, batch_first=True)
    st.quantize_(layer, st.LSQ(w_bits=4, a_bits=4))
    ca = layer.multihead_attn
    assert input_quantizer(ca.k_proj) is input_quantizer(ca.v_proj)
    assert input_quantizer(ca.q_proj) is not input_quantizer(ca.k_proj)
    x, mem = torch.randn(2, 5, D), torch.randn(2, 6, D)
    # self_attn (q/k/v shared) + out, cross q, cross k/v shared, cross out, linear1, linear2
    assert st.calibrate(layer, lambda m: m(x, mem)) == 7


def test_hawq_traces_cover_the_split_projections():
    from slimtorch.search.hessian import select_weights
    model = _encoder(True, False)
    chosen, _ = select_weights(model)
    assert {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"} <= set(chosen)
