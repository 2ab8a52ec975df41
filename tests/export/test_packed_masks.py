"""Pruned + quantized layers in the packed file: bitmap or index list (cost.mask_bytes' choice) plus
the kept weights' codes only, dense where that is smaller; load_packed is bit-exact; file bytes per
layer equal the cost module's count; a corrupted mask is refused."""
import json

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.cost import layer_cost, model_costs, stored_bytes
from slimtorch.errors import CheckpointError
from slimtorch.export.file_report import file_report
from slimtorch.export.packed import read_packed


pytestmark = pytest.mark.usefixtures("one_thread")


class _Reshape(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], 4, 16)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64),
                         _Reshape(), nn.Conv1d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 10))


def _model(q):
    m = _net()
    st.prune_(m, st.Magnitude(remaining=0.03), include="0")                 # 122 kept: index list
    st.prune_(m, st.HardMovement(remaining=0.5, total_steps=2), include="2")  # bitmap
    st.prune_(m, st.Magnitude(remaining=0.9), include="4")                  # dense codes are smaller
    st.prune_(m, st.Magnitude(remaining=0.25, structure="rows"), include="6")
    st.quantize_(m, q)
    st.calibrate(m, [(torch.randn(8, 64),)])
    opt = torch.optim.SGD(st.prune_param_groups(m, lr=0.1), lr=0.1)
    for _ in range(2):
        m(torch.randn(8, 64)).pow(2).mean().backward(); opt.step(); opt.zero_grad(); st.step(m)
    return m.eval()


@pytest.mark.parametrize("q", [st.LSQ(w_bits=4, a_bits=8), st.LSQPlus(w_bits=3, a_bits=8, weights="per_channel")],
                         ids=["lsq", "lsq+"])
def test_masked_layers_round_trip_bit_exactly_at_the_cost_module_count(q, tmp_path):
    m = _model(q)
    x = torch.randn(5, 64)
    with torch.no_grad():
        want = m(x)
    info = st.save_packed(m, tmp_path / "m.slim")
    meta, tensors, _ = read_packed(tmp_path / "m.slim")
    kinds = {e["name"]: (e["kind"], e.get("mask")) for e in meta["layers"]}
    assert kinds == {"0": ("masked", "index"), "2": ("masked", "bitmap"), "4": ("codes", None),
                     "6": ("masked", "bitmap"), "8": ("codes", None)}
    assert [e["kept"] for e in meta["layers"] if e["kind"] == "masked"] == [122, 2048, 12]
    costs = model_costs(m)
    assert info["theoretical_bytes"] == costs["stored_bytes"] < costs["bytes"]
    rep = file_report(tmp_path / "m.slim")
    for r in rep.rows:                          # per layer: file bytes = the cost module's count
        assert r["file_bytes"] == r["theory_bytes"] == stored_bytes(layer_cost(r["name"], m.get_submodule(r["name"]))), r
    row0 = layer_cost("0", m[0])
    assert rep.rows[0]["file_bytes"] == (122 * q.w_bits + 7) // 8 + 122 * 2 + 4 * (64 + row0.qparams)
    assert rep.totals["within_limit"]
    got = st.load_packed(tmp_path / "m.slim", _net())
    with torch.no_grad():
        assert torch.equal(got(x), want)
    again = st.load_packed(tmp_path / "m.slim", _net(), runtime="fakequant")
    with torch.no_grad():
        assert torch.equal(again(x), want)


def test_corrupt_masks_are_refused(tmp_path):
    from slimtorch.export.container import read_container, write_container
    m = _model(st.LSQ(w_bits=4, a_bits=8))
    st.save_packed(m, tmp_path / "m.slim")
    meta, tensors, _ = read_container(tmp_path / "m.slim")
    bad = dict(tensors)
    idx = bad["0.mask_index"].clone()
    idx[0], idx[2] = idx[2].clone(), idx[0].clone()            # indices out of order
    bad["0.mask_index"] = idx
    meta = {k: v for k, v in meta.items() if k != "crc32"}
    write_container(tmp_path / "bad.slim", bad, meta)
    with pytest.raises(CheckpointError, match="mask_index is not 122 increasing indices"):
        st.load_packed(tmp_path / "bad.slim", _net())
    meta2 = json.loads(json.dumps(meta))
    meta2["layers"][1]["kept"] = 2047                          # same packed size at 4 bits: the bitmap tells
    write_container(tmp_path / "bad2.slim", dict(tensors), meta2)
    with pytest.raises(CheckpointError, match="its bitmap keeps 2048 weights, the header says 2047"):
        st.load_packed(tmp_path / "bad2.slim", _net())
    meta2["layers"][1]["kept"] = 2000
    write_container(tmp_path / "bad3.slim", dict(tensors), meta2)
    with pytest.raises(CheckpointError, match=r"layers\[1\].kept: tensor 2.w_codes holds 1024"):
        st.load_packed(tmp_path / "bad3.slim", _net())
