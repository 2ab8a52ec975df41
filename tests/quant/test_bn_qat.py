"""QAT with BatchNorm folded (quant/bn_qat.py): the quantizer sees W * gamma / sigma, batch statistics
until freeze_bn_stats, and the packed file / ONNX store the folded weight and bias."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch as st
from slimtorch.attach import raw_weight, weight_transforms
from slimtorch.quant.bn_fold import FoldedBatchNorm
from slimtorch.quant.bn_qat import BatchNormFold, FoldedWeight

from bn_helpers import randomise_bn, rel  # noqa: E402


def net():
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, groups=6), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 6 * 6, 4))


def setup(seed=0):
    torch.manual_seed(seed)
    model = randomise_bn(net())
    x = torch.randn(16, 2, 8, 8)
    with torch.no_grad():
        want = model.eval()(x)
    model.train()
    result = st.fold_batchnorm_(model, x, train=True)
    return model, x, want, result


def test_train_fold_is_exact_in_eval_and_quantizes_folded_weight():
    model, x, want, result = setup()
    assert result.folded == [("0", "1"), ("3", "4")] and isinstance(model[1], BatchNormFold)
    with torch.no_grad():
        assert rel(model.eval()(x), want) <= 1e-6
    st.quantize_(model, st.LSQ(w_bits=4, a_bits=8))
    ts = weight_transforms(model[0])
    assert isinstance(ts[0], FoldedWeight) and isinstance(ts[1], st.quant.Quantizer)   # fold BEFORE quantizer
    bn = model[1].bn
    folded = raw_weight(model[0]) * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(ts[0](raw_weight(model[0])), folded)
        assert torch.equal(model[0].weight, ts[1](folded))


def test_batch_stats_then_frozen():
    model, x, _, _ = setup()
    st.quantize_(model, st.LSQ(w_bits=4, a_bits=4))
    st.calibrate(model, [x])
    opt = torch.optim.SGD(model.parameters(), 1e-2)
    y = torch.randint(0, 4, (16,))
    model.train()
    before = model[1].bn.running_mean.clone()
    for _ in range(3):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        assert model[1].bn.weight.grad is not None and model[1].bn.weight.grad.abs().sum() > 0
        opt.step()
    assert not torch.equal(model[1].bn.running_mean, before)          # batch statistics, updated
    assert st.freeze_bn_stats(model) == 2
    frozen = model[1].bn.running_mean.clone()
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(model[1].bn.running_mean, frozen)              # running statistics, fixed
    with torch.no_grad():
        train_out = model(x)
        assert torch.equal(train_out, model.eval()(x))                # frozen = the deployed function


def test_packed_and_onnx_store_the_folded_layer(tmp_path):
    model, x, _, _ = setup(1)
    st.quantize_(model, st.LSQ(w_bits=4, a_bits=8, weights="per_channel"))
    st.calibrate(model, [x])
    model.train()
    F.cross_entropy(model(x), torch.zeros(16, dtype=torch.long)).backward()   # one batch-stat step
    st.freeze_bn_stats(model)
    model.eval()
    with torch.no_grad():
        want = model(x)
    st.save_packed(model, tmp_path / "m.slim")
    meta = st.export.packed.read_packed(tmp_path / "m.slim")[0]
    assert meta["folded_bn"] == [["0", "1"], ["3", "4"]]
    assert not any(k.startswith(("1.", "4.")) for ks in meta["state"].values() for k, _ in ks)
    for runtime in ("float", "fakequant"):
        loaded = st.load_packed(tmp_path / "m.slim", net(), runtime=runtime)
        assert isinstance(loaded[1], FoldedBatchNorm)
        with torch.no_grad():
            assert torch.equal(loaded(x), want)
    pytest.importorskip("onnxruntime")
    from slimtorch.export.onnx_export import ort_session
    st.export_onnx(model, tmp_path / "m.onnx", (x[:2],), input_names=["x"], exact=True)
    got = ort_session(tmp_path / "m.onnx").run(None, {"x": x.numpy()})[0]
    assert np.abs(got - want.numpy()).max() <= 1e-5 * want.abs().max().item()
    ops = {n.op_type for n in __import__("onnx").load(str(tmp_path / "m.onnx")).graph.node}
    assert "BatchNormalization" not in ops
