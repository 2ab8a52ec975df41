"""A small nn.TransformerEncoder classifier (Embedding front, Linear head): packed round trip with
identical outputs, report bytes = budget bytes, file size near them, and ONNX export."""
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.cost import model_costs


class Classifier(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0,
                                                                    batch_first=batch_first), 2,
                                         enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)
        self.batch_first = batch_first

    def forward(self, ids):
        h = self.emb(ids)
        h = self.enc(h) if self.batch_first else self.enc(h.transpose(0, 1)).transpose(0, 1)
        return self.head(h.mean(1))


IDS = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(0))


def _quantized(batch_first=True, **cfg):
    model = Classifier(batch_first)
    st.quantize_(model, st.LSQPlus(**{"w_bits": 4, "a_bits": 4, **cfg}))
    st.calibrate(model, [IDS])
    return model.eval()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("runtime", ["float", "fakequant"])
def test_round_trip_identical(tmp_path, batch_first, runtime):
    model = _quantized(batch_first)
    info = st.save_packed(model, tmp_path / "m.slim")
    loaded = st.load_packed(tmp_path / "m.slim", Classifier(batch_first), runtime=runtime)
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))
    costs = model_costs(model)
    assert st.report(model).totals["bytes"] == costs["bytes"] == info["theoretical_bytes"]
    assert info["file_bytes"] <= 1.02 * costs["bytes"] + 4096
    if runtime == "fakequant":
        assert st.report(loaded).totals["bytes"] == costs["bytes"]


def test_mixed_bits_and_per_channel_round_trip(tmp_path):
    model = Classifier()
    plan = {"enc.layers.0.self_attn.q_proj": 8, "enc.layers.1.self_attn.out_proj": 2}
    st.quantize_(model, st.LSQ(w_bits=4, a_bits=4, weights="per_channel"), plan=plan)
    st.calibrate(model, [IDS])
    model.eval()
    info = st.save_packed(model, tmp_path / "m.slim")
    loaded = st.load_packed(tmp_path / "m.slim", Classifier())
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))
    assert info["file_bytes"] <= 1.02 * info["theoretical_bytes"] + 4096


def test_int8_runtime_runs(tmp_path):
    model = _quantized(w_bits=8, a_bits=8)
    st.save_packed(model, tmp_path / "m.slim")
    loaded = st.load_packed(tmp_path / "m.slim", Classifier(), runtime="int8")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), model(IDS), atol=1e-3, rtol=1e-3)


def test_onnx_export_matches(tmp_path):
    pytest.importorskip("onnxruntime")
    from slimtorch.export.onnx_export import ort_session
    model = _quantized(a_bits=8)
    path = st.export_onnx(model, tmp_path / "m.onnx", IDS, exact=True)
    sess = ort_session(path)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    for x in (IDS, ids):
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-5, rtol=1e-5)
