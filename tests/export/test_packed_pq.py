"""Product-quantized layers in the packed file (export/packed_pq.py): save_packed / load_packed of an
iPQ model gives identical outputs (float and fakequant runtimes, float32 or int8 centroids, codes
wider than 8 bits), per-layer file bytes equal the cost module's count, the file is within
1.02 x + 4 KiB of it, and bad files or unsupported stacks are refused by name."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch as st
from slimtorch.cost import layer_cost, model_costs
from slimtorch.errors import CheckpointError, ConfigError
from slimtorch.export.container import read_container, write_container
from slimtorch.export.file_report import file_report
from slimtorch.export.packed_pq import codes_size, pack_codes, unpack_codes


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = self.emb(x)                                     # (b, t, 8)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = self.norm(h + self.fc2(F.relu(self.fc1(h))))
        return self.out(h.mean(1))


def _net():
    torch.manual_seed(0)
    return Net()


X, Y = torch.randint(0, 30, (6, 5)), torch.randint(0, 4, (6,))


def _ipq(int8):
    m = _net()
    cfg = st.PQ(n_centroids=16, n_iter=4, int8_centroids=int8)
    for _ in st.ipq_stages(m, [["fc1", "fc2"], ["emb", "conv"]], cfg):
        opt = torch.optim.SGD(st.pq_param_groups(m, lr=0.1), lr=0.1)
        F.cross_entropy(m(X), Y).backward()
        opt.step(); opt.zero_grad()
    return m.eval()


@pytest.mark.parametrize("int8", [False, True], ids=["f32-centroids", "int8-centroids"])
def test_ipq_model_round_trips_with_identical_outputs_at_the_cost_count(int8, tmp_path):
    m = _ipq(int8)
    with torch.no_grad():
        want = m(X)
    info = st.save_packed(m, tmp_path / "m.slim")
    assert info["theoretical_bytes"] == model_costs(m)["stored_bytes"]
    assert info["file_bytes"] <= 1.02 * info["theoretical_bytes"] + 4096
    rep = file_report(tmp_path / "m.slim")
    for r in rep.rows:
        assert r["file_bytes"] == r["theory_bytes"] == layer_cost(r["name"], m.get_submodule(r["name"])).bytes, r
    assert "PQ 16/8" in str(rep)
    for runtime in ("float", "fakequant"):
        got = st.load_packed(tmp_path / "m.slim", _net(), runtime=runtime)
        with torch.no_grad():
            assert torch.equal(got(X), want), runtime
    again = st.load_packed(tmp_path / "m.slim", _net(), runtime="fakequant")
    assert [n for n, _, _ in st.pq_layers(again)] == ["emb", "conv", "fc1", "fc2"]
    assert model_costs(again)["bytes"] == model_costs(m)["bytes"]


def test_codes_wider_than_8_bits(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 20))
    st.pq_(m, st.PQ(n_centroids=600, block_size=1, n_iter=1))             # 640 codes at 10 bits
    st.save_packed(m, tmp_path / "m.slim")
    assert file_report(tmp_path / "m.slim").rows[0]["file_bytes"] == 640 + 160 + 4 * 600 + 4 * 20
    got = st.load_packed(tmp_path / "m.slim", nn.Sequential(nn.Linear(32, 20)))
    assert torch.equal(got[0].weight, m[0].weight)
    c = torch.randint(0, 1 << 13, (37,))
    assert torch.equal(unpack_codes(pack_codes(c, 13), 13, 37), c) and codes_size(37, 13) == 37 + 24


def test_a_pruned_then_product_quantized_layer_round_trips(tmp_path):
    m = _net()
    st.prune_(m, st.Magnitude(remaining=0.5), include="fc1")
    st.pq_(m, st.PQ(n_centroids=8, n_iter=2), include="fc1")
    st.save_packed(m, tmp_path / "m.slim")
    got = st.load_packed(tmp_path / "m.slim", _net())
    with torch.no_grad():
        assert torch.equal(got(X), m(X))


def test_a_scalar_quantizer_after_the_codebook_is_refused_by_name(tmp_path):
    m = _net()
    st.pq_(m, st.PQ(n_centroids=8, n_iter=2), include="fc1")
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=8), include="fc1")
    st.calibrate(m, [(X,)])
    with pytest.raises(ConfigError, match=r"layer 'fc1': product quantization followed by \['LSQQuantizer'\].*"
                                          "int8_centroids=True"):
        st.save_packed(m, tmp_path / "m.slim")


def test_load_packed_needs_a_model_without_codebooks(tmp_path):
    m = _ipq(False)
    st.save_packed(m, tmp_path / "m.slim")
    with pytest.raises(ConfigError, match="needs a float model"):
        st.load_packed(tmp_path / "m.slim", m)


def test_corrupt_codebook_entries_are_refused(tmp_path):
    m = _net()
    st.pq_(m, st.PQ(n_centroids=12, n_iter=2), include="fc1")       # 4-bit codes, only 12 centroids
    st.save_packed(m, tmp_path / "m.slim")
    meta, tensors, _ = read_container(tmp_path / "m.slim")
    meta = {k: v for k, v in meta.items() if k != "crc32"}
    i = next(j for j, e in enumerate(meta["layers"]) if e["name"] == "fc1")
    bad = json.loads(json.dumps(meta))
    bad["layers"][i]["centroids"] = 11
    write_container(tmp_path / "b1.slim", dict(tensors), bad)
    with pytest.raises(CheckpointError, match=r"tensor fc1.codebook has shape \[12, 8\], expected \[11, 8\]"):
        st.load_packed(tmp_path / "b1.slim", _net())
    bad = json.loads(json.dumps(meta))
    bad["layers"][i]["bits"] = 5
    write_container(tmp_path / "b2.slim", dict(tensors), bad)
    with pytest.raises(CheckpointError, match=r"layers\[\d\].bits: .*12 centroids take 4 bits"):
        st.load_packed(tmp_path / "b2.slim", _net())
    codes = dict(tensors)
    codes["fc1.w_codes"] = torch.full_like(tensors["fc1.w_codes"], 0xFF)   # code 15 >= 12 centroids
    write_container(tmp_path / "b3.slim", codes, meta)
    with pytest.raises(CheckpointError, match="code 15 in w_codes, the codebook has 12 centroids"):
        st.load_packed(tmp_path / "b3.slim", _net())
