"""ONNX export of product-quantized layers (export/onnx_pq.py): onnxruntime's outputs match
PyTorch's within float rounding for Linear / Conv1d / Conv2d / Embedding; a large layer's codebook
and uint8 codes are initializers, W = Gather(C, codes), and the file is a fraction of the dense one;
a PQ model mixed with scalar-quantized layers exports; the model is left unchanged."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch as st

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from slimtorch.export.onnx_export import export_onnx, ort_session  # noqa: E402
from slimtorch.export.onnx_pq import PQLayer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.c1 = nn.Conv1d(16, 16, 3, padding=1)
        self.c2 = nn.Conv2d(1, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16, bias=False)
        self.head = nn.Linear(16 * 4, 3)

    def forward(self, ids):                                           # (B, T)
        h = self.emb(ids)
        h = self.c1(h.transpose(1, 2)).transpose(1, 2)               # (B, T, 16)
        h = h + self.fc2(F.relu(self.fc1(h)))
        h = self.c2(h.mean(1).reshape(-1, 1, 4, 4))                   # (B, 16, 4, 4)
        return self.head(h.mean(2).flatten(1))


def _pq_net():
    torch.manual_seed(0)
    return st.pq_(Net(), st.PQ(n_centroids=16, n_iter=3)).eval()


IDS = torch.randint(0, 40, (5, 7))


def _ort(path, ids):
    return ort_session(path, threads=1).run(None, {"ids": ids.numpy()})[0]


def test_pq_model_runs_in_onnxruntime_like_pytorch(tmp_path):
    m = _pq_net()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    path = export_onnx(m, tmp_path / "pq.onnx", (IDS,), input_names=["ids"])
    with torch.no_grad():
        ref = m(IDS).numpy()
    np.testing.assert_allclose(_ort(path, IDS), ref, rtol=1e-4, atol=1e-5)
    other = torch.randint(0, 40, (2, 7))                               # dynamic batch
    with torch.no_grad():
        np.testing.assert_allclose(_ort(path, other), m(other).numpy(), rtol=1e-4, atol=1e-5)
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


class Wide(nn.Module):
    """A layer with more codes than the exporter's constant folding takes (> 8192 inputs)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(256, 512)

    def forward(self, x):
        return self.fc(x)


def test_a_large_layer_keeps_codes_and_codebook_in_the_file(tmp_path):
    torch.manual_seed(0)
    m = st.pq_(Wide(), st.PQ(n_centroids=256, n_iter=2)).eval()
    x = torch.randn(3, 4, 256)
    path = export_onnx(m, tmp_path / "pq.onnx", (x,), input_names=["x"])
    graph = onnx.load(str(path)).graph
    assert "Gather" in {n.op_type for n in graph.node}
    assert [list(i.dims) for i in graph.initializer if i.data_type == onnx.TensorProto.UINT8] == [[512 * 32]]
    assert path.stat().st_size < 512 * 256 * 4 / 10                    # vs 512 KiB of float32 weights
    out = ort_session(path, threads=1).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, m(x).numpy(), rtol=1e-4, atol=1e-4)


def test_pq_and_scalar_quantized_layers_in_one_model(tmp_path):
    torch.manual_seed(0)
    m = Net()
    st.pq_(m, st.PQ(n_centroids=16, n_iter=3), include=["fc1", "fc2", "emb"])
    st.quantize_(m, st.LSQ(w_bits=8, a_bits=8), include=["head", "c1"])
    with torch.no_grad():
        m(IDS)                                                         # initialise the quantizers
    m.eval()
    path = export_onnx(m, tmp_path / "mix.onnx", (IDS,), input_names=["ids"], exact=True)
    with torch.no_grad():
        np.testing.assert_allclose(_ort(path, IDS), m(IDS).numpy(), rtol=1e-4, atol=1e-4)


def test_stand_in_rebuilds_the_fake_quant_weight_and_int8_centroids():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    st.pq_(nn.Sequential(lin), st.PQ(n_centroids=4, n_iter=2, int8_centroids=True))
    layer = PQLayer(lin)
    assert torch.equal(layer.weight(), lin.weight) and layer.codes.dtype == torch.uint8
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), lin(x))
