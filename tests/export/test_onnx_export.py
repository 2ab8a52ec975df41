"""ONNX QDQ export: runs in onnxruntime, matches PyTorch (exactly without graph rewrites), leaves the
model unchanged; Embedding/Linear/Conv1d/Conv2d, LSQ/LSQ+, MatMulNBits for 4-bit Linear weights."""
import numpy as np
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.errors import ConfigError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from slimtorch.export.onnx_export import export_onnx, ort_session  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(1, 6, 3)
        self.fc = nn.Linear(6 * 2 * 6, 5)

    def forward(self, x):                        # x: (B, 2, 8)
        y = torch.relu(self.c1(x))               # (B, 4, 8)
        y = torch.relu(self.c2(y.unsqueeze(1)))  # (B, 6, 2, 6)
        return self.fc(y.flatten(1))


def run(path, x, opt):
    return ort_session(path, optimization=opt).run(None, {"x": x.numpy()})[0]


@pytest.mark.parametrize("cfg", [st.LSQ(w_bits=8, a_bits=8, weights="per_tensor", w_init="lsq", a_init="lsq"),
                                 st.LSQ(w_bits=4, a_bits=4, weights="per_channel"),
                                 st.LSQPlus(w_bits=3, a_bits=5, a_init="minmax")], ids=["w8a8", "w4a4-pc", "lsq+w3a5"])
def test_cnn_parity(cfg, tmp_path):
    torch.manual_seed(0)
    m = Net()
    st.quantize_(m, cfg)
    x = torch.randn(64, 2, 8)
    st.calibrate(m, [x])
    m.eval()
    with torch.no_grad():
        want = m(x)
    export_onnx(m, tmp_path / "m.onnx", (x[:2],), input_names=["x"])
    with torch.no_grad():
        assert torch.equal(m(x), want)           # the model is restored after the export
    assert not m.training and not any(mod.training for mod in m.modules())
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    scale = want.abs().max().item()
    got = run(tmp_path / "m.onnx", x, "none")    # the graph as exported: same arithmetic
    assert np.abs(got - want.numpy()).max() <= 1e-5 * scale
    got = run(tmp_path / "m.onnx", x, "all")     # onnxruntime's fused integer kernels
    assert (got.argmax(1) == want.numpy().argmax(1)).mean() >= 0.9
    export_onnx(m, tmp_path / "x.onnx", (x[:2],), input_names=["x"], exact=True)
    got = run(tmp_path / "x.onnx", x, "all")     # exact: float kernels, every optimization on
    assert np.abs(got - want.numpy()).max() <= 1e-5 * scale


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def test_bert_embeddings_and_matmul_nbits(tmp_path):
    from slimtorch.export.modelspec import HFEncoder
    m = tiny_bert()
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=8, weights="per_channel"), exclude=["pooler*"])
    ids = torch.randint(0, 100, (4, 12))
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    st.calibrate(m, lambda mm: mm(**feeds))
    net = HFEncoder(m)
    with torch.no_grad():
        want = net(**feeds).numpy()
    dyn = {k: {0: torch.export.Dim("b"), 1: torch.export.Dim("s", min=2, max=32)} for k in feeds}
    np_feeds = {k: v.numpy() for k, v in feeds.items()}
    for block in (16,):
        path = export_onnx(net, tmp_path / f"b{block}.onnx", {k: v[:2, :6] for k, v in feeds.items()},
                           dynamic_shapes=dyn, matmul_nbits=block)
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert {"MatMulNBits", "Gather", "DequantizeLinear"} <= ops
        got = ort_session(path, optimization="none").run(None, np_feeds)[0]
        cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
        assert cos.min() > 0.999, block


def test_export_errors(tmp_path):
    with pytest.raises(ConfigError, match="no quantized layer"):
        export_onnx(Net(), tmp_path / "m.onnx", (torch.randn(1, 2, 8),))
    m = Net()
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=4))
    with pytest.raises(ConfigError, match="power of two"):
        export_onnx(m, tmp_path / "m.onnx", (torch.randn(1, 2, 8),), matmul_nbits=24)
