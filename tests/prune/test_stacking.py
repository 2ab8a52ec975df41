"""A mask stacks with a quantizer on the same layer in either order: W' = Q(W * M); calibration,
bias correction, save_packed / load_packed and the report work on it."""
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.cost import layer_costs, mask_bytes, model_costs, weight_mask
from slimtorch.errors import ConfigError
from slimtorch.quant import weight_quantizer


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _data(n=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("order", ["prune_then_quantize", "quantize_then_prune"])
def test_chain_is_q_of_w_times_m(order):
    model = _net()
    cfg_p, cfg_q = st.Magnitude(remaining=0.2), st.LSQ(w_bits=4, a_bits=8)
    if order == "prune_then_quantize":
        st.prune_(model, cfg_p); st.quantize_(model, cfg_q)
    else:
        st.quantize_(model, cfg_q); st.prune_(model, cfg_p)
    st.calibrate(model, _data())
    for m in (model[0], model[2]):
        chain = list(m.parametrizations.weight)
        mk, wq = weight_mask(m), weight_quantizer(m)
        assert chain == [mk, wq]                                   # the mask before the quantizer
        assert wq.initialized
        W = m.parametrizations.weight.original
        M = mk.mask_for(W).to(W.dtype)
        torch.testing.assert_close(m.weight, wq(W * M), rtol=0, atol=0)
        assert (m.weight[M == 0] == 0).all()                       # pruned weights stay exactly 0
        assert int((m.weight != 0).sum()) <= int(M.sum())


def test_calibration_sees_the_masked_weight():
    import copy
    model = _net()
    st.prune_(model, st.Magnitude(remaining=0.1))
    st.quantize_(model, st.LSQ(w_bits=4, a_bits=None, weights="per_tensor", w_init="lsq"))  # s = 2<|w|>/sqrt(Qp)
    st.calibrate(model, _data())
    wq = weight_quantizer(model[0])
    W = model[0].parametrizations.weight.original.detach()
    on_masked, on_dense = copy.deepcopy(wq), copy.deepcopy(wq)
    on_masked.initialize(W * weight_mask(model[0]).mask_for(W))
    on_dense.initialize(W)
    assert torch.equal(wq.scale, on_masked.scale) and not torch.equal(wq.scale, on_dense.scale)


def test_bias_correction_packed_roundtrip_and_costs(tmp_path):
    model = _net()
    st.quantize_(model, st.LSQ(w_bits=4, a_bits=8))
    st.prune_(model, st.HardMovement(remaining=0.25, total_steps=3))
    opt = torch.optim.SGD(st.prune_param_groups(model, lr=0.05), lr=0.05)
    st.calibrate(model, _data())
    for x, y in _data(3):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step(); opt.zero_grad(); st.step(model)
    assert st.bias_correct_(model, _data(2)) == 2
    model.eval()
    x = torch.randn(5, 16)
    path = tmp_path / "m.slim"
    st.save_packed(model, path)
    loaded = st.load_packed(path, _net())
    assert torch.equal(loaded(x), model(x))                        # bit-exact (kept codes + mask)
    rows = {r.name: r for r in layer_costs(model)}
    r = rows["0"]
    assert r.kept == 128 and r.sparsity == pytest.approx(0.75)
    assert (r.mask_bytes, r.mask_format) == mask_bytes(512, 128) == (64, "bitmap")
    assert r.sparse_bytes == 128 * 4 // 8 + 64 + 4 * (32 + r.qparams)
    assert r.bytes == 512 * 4 // 8 + 4 * (32 + r.qparams)          # the dense file's count is unchanged
    text = str(st.report(model))
    assert "kept" in text and "25.00%" in text and "pruned: 480 of 640 weights" in text
    assert model_costs(model)["sparsity"] == pytest.approx(0.75)


def test_mask_bytes_picks_the_smaller_format():
    assert mask_bytes(1000, 10) == (20, "index")          # 2-byte indices: 20 B < 125 B bitmap
    assert mask_bytes(1000, 500) == (125, "bitmap")
    assert mask_bytes(200, 3) == (3, "index")             # 1-byte indices
    assert mask_bytes(147456, 4423) == (17692, "index")   # 3% of a 384x384 layer, 4-byte indices
    assert mask_bytes(147456, 14745) == (18432, "bitmap")


def test_masked_float_layer_is_refused_by_save_packed(tmp_path):
    model = _net()
    st.prune_(model, st.Magnitude(remaining=0.5))
    with pytest.raises(ConfigError, match="apply_masks_"):
        st.save_packed(model, tmp_path / "m.slim")
    st.apply_masks_(model)
    st.save_packed(model, tmp_path / "m.slim")


def test_report_without_masks_is_unchanged():
    model = _net()
    text = str(st.report(model))
    assert "kept" not in text and "pruned:" not in text
