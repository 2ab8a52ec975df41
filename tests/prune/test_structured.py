"""Structured masks: blocks, rows, columns, heads and FFN neurons (scores aggregated per group)."""
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.cost import weight_mask
from slimtorch.errors import ConfigError
from slimtorch.prune import layer_masks, min_kept


def _lin(out=16, inp=32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inp, out))


@pytest.mark.parametrize("structure,block,shape", [("blocks", (4, 8), (4, 4)), ("rows", (32, 32), (16,)),
                                                   ("columns", (32, 32), (32,))])
def test_group_masks_are_constant_per_group(structure, block, shape):
    model = _lin()
    st.prune_(model, st.Magnitude(remaining=0.25, structure=structure, block=block))
    M = layer_masks(model)["0"]
    assert M.float().mean() == 0.25
    W = model[0].parametrizations.weight.original.detach().abs()
    if structure == "rows":
        assert (M.all(1) | ~M.any(1)).all()
        kept = M.all(1)
        assert W[kept].mean(1).min() >= W[~kept].mean(1).max()     # the largest mean |W| rows kept
    elif structure == "columns":
        assert (M.all(0) | ~M.any(0)).all()
    else:
        tiles = M.reshape(4, 4, 4, 8)
        assert (tiles.all(3).all(1) | ~tiles.any(3).any(1)).all()
    assert weight_mask(model[0]).importance(W).shape == shape


def test_block_scores_gradient_is_movement_summed_over_the_block():
    model = _lin(8, 8)
    st.prune_(model, st.HardMovement(remaining=0.5, total_steps=10, structure="blocks", block=(2, 4)))
    x = torch.randn(5, 8)
    out = model(x)
    g = torch.randn_like(out)
    out.backward(g)
    W = model[0].parametrizations.weight.original.detach()
    dW = g.t() @ x                                          # dL/dW' (all kept during the warm-up)
    want = (dW * W).reshape(4, 2, 2, 4).sum(dim=(1, 3))
    torch.testing.assert_close(weight_mask(model[0]).scores.grad, want, rtol=1e-5, atol=1e-6)


def test_heads_tie_q_k_v_and_out_proj():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 4, batch_first=True)
    st.prune_(mha, st.HardMovement(remaining=0.5, total_steps=4, structure="heads"))
    masks = [weight_mask(getattr(mha, p)) for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    assert [m.tie_first for m in masks] == [True, False, False, False]
    params = st.prune_param_groups(mha, lr=0.1)
    assert sum(p.numel() for p in params[-1]["params"]) == 4        # one score per head, once
    x = torch.randn(2, 3, 8)
    mha(x, x, x)[0].sum().backward()
    grads = {}
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):    # dL/dS_h = sum over the 4 matrices
        lin = getattr(mha, p)
        W = lin.parametrizations.weight.original
        grads[p] = W.detach() * lin.parametrizations.weight.original.grad
    per_head = sum(grads[p].reshape(4, 2, 8).sum((1, 2)) for p in ("q_proj", "k_proj", "v_proj")) \
        + grads["out_proj"].reshape(8, 4, 2).sum((0, 2))
    torch.testing.assert_close(masks[0].scores.grad, per_head, rtol=1e-5, atol=1e-6)
    for _ in range(4):
        st.step(mha)
    M = layer_masks(mha)
    assert M["q_proj"].reshape(4, 2, 8).all((1, 2)).sum() == 2
    assert torch.equal(M["q_proj"].any(1), M["out_proj"].any(0))


def test_magnitude_neurons_use_both_matrices():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 6, dropout=0.0)
    with torch.no_grad():
        layer.linear1.weight.fill_(1.0)                     # rows all equal: only linear2 decides
        layer.linear2.weight.copy_(torch.arange(6.0).repeat(8, 1))
    st.prune_(layer, st.Magnitude(remaining=0.5, structure="neurons"))
    M = layer_masks(layer)
    assert M["linear1"].all(1).tolist() == [False, False, False, True, True, True]
    assert torch.equal(M["linear2"].all(0), M["linear1"].all(1))


def test_floor_of_one_group_and_global_scope():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    st.prune_(model, st.Magnitude(remaining=0.01, structure="rows"))
    M = layer_masks(model)
    assert int(M["0"].all(1).sum()) == min_kept(16) == 1 and M["2"].all(1).sum() == 1
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    st.prune_(model, st.HardMovement(remaining=0.5, total_steps=2, structure="columns", scope="global"))
    for _ in range(2):
        st.step(model)
    assert st.sparsity(model)["kept"] > 0


def test_bad_structures_fail_with_named_errors():
    with pytest.raises(ConfigError, match="structure='diagonal'"):
        st.Magnitude(structure="diagonal")
    with pytest.raises(ConfigError, match="block="):
        st.Magnitude(structure="blocks", block=(0, 4))
    with pytest.raises(ConfigError, match=r"layer '0' \(blocks\).*whole number of blocks \[5, 4\]"):
        st.prune_(_lin(), st.Magnitude(structure="blocks", block=(5, 4)))
    cfg = st.config_from_dict({"method": "magnitude", "structure": "blocks", "block": [4, 4]})
    assert cfg.block == (4, 4) and st.config_to_dict(cfg)["block"] == [4, 4]
