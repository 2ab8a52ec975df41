"""save_packed / load_packed: outputs identical to the fake-quant model for every quantizer kind,
per-tensor and per-channel, first and last layers, Conv1d/Conv2d/Linear/Embedding; exact sizes."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import slimtorch as st
from slimtorch.attach import add_weight_transform
from slimtorch.errors import ConfigError
from slimtorch.export import load_packed, read_packed, save_packed
from slimtorch.quant import LSQQuantizer
from slimtorch.quant.api import quantized_layers

CONFIGS = {
    "lsq-tensor": lambda: st.LSQ(w_bits=4, a_bits=4),
    "lsq-channel": lambda: st.LSQ(w_bits=3, a_bits=5, weights="per_channel"),
    "lsq+-tensor": lambda: st.LSQPlus(w_bits=4, a_bits=4),
    "lsq+-channel": lambda: st.LSQPlus(w_bits=2, a_bits=6, weights="per_channel"),
}
try:
    from slimtorch.quant.uhlich import Uhlich
    CONFIGS["uhlich-uniform"] = lambda: Uhlich(kind="uniform", w_bits=4, a_bits=4)
    CONFIGS["uhlich-pow2"] = lambda: Uhlich(kind="pow2", w_bits=4, a_bits=4)
except ImportError:  # pragma: no cover - quantizers of a later issue
    pass


class Mixed(nn.Module):
    """Embedding (first) -> Conv1d (padded) -> LayerNorm -> Conv2d -> Linear (last)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.conv1 = nn.Conv1d(6, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.conv2 = nn.Conv2d(1, 3, 3)
        self.head = nn.Linear(3 * 6 * 6, 5)

    def forward(self, ids):
        x = torch.relu(self.conv1(self.emb(ids).transpose(1, 2)))
        x = self.norm(x.transpose(1, 2))
        return self.head(self.conv2(x.unsqueeze(1)).flatten(1))


def fresh():
    torch.manual_seed(0)
    return Mixed()


def quantized(cfg, plan=None):
    m = fresh()
    st.quantize_(m, cfg, plan=plan)
    ids = torch.randint(0, 20, (16, 8))
    st.calibrate(m, [ids])
    with torch.no_grad():  # move the model off its initial state: outputs must still match
        m.norm.weight.mul_(1.5)
    return m.eval(), ids


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_every_quantizer(name, tmp_path):
    m, ids = quantized(CONFIGS[name]())
    with torch.no_grad():
        want = m(ids)
    info = save_packed(m, tmp_path / "m.slim")
    assert info["file_bytes"] == (tmp_path / "m.slim").stat().st_size
    for runtime in ("float", "fakequant"):
        got = load_packed(tmp_path / "m.slim", fresh, runtime=runtime)
        with torch.no_grad():
            assert torch.equal(got(ids), want), runtime
    assert {n for n, *_ in quantized_layers(got)} == {"emb", "conv1", "conv2", "head"}


def test_mixed_bits_every_width(tmp_path):
    plan = {"emb": 8, "conv1": 3, "conv2": 5, "head": {"w_bits": 7, "a_bits": 6}}
    m, ids = quantized(st.LSQ(w_bits=2, a_bits=2), plan)
    parametrize.remove_parametrizations(m.emb, "weight")   # 1-bit unsigned weights {0, s}
    add_weight_transform(m.emb, LSQQuantizer(1, "weight", signed=False))
    with torch.no_grad():
        want = m(ids)
    save_packed(m, tmp_path / "m.slim")
    meta, tensors, _ = read_packed(tmp_path / "m.slim")
    assert {e["name"]: e["bits"] for e in meta["layers"]} == {"emb": 1, "conv1": 3, "conv2": 5, "head": 7}
    assert tensors["conv2.w_codes"].numel() == -(-27 * 5 // 8)
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "m.slim", fresh())(ids), want)


def test_resave_is_a_fixed_point_and_float_state(tmp_path):
    m, ids = quantized(st.LSQPlus(w_bits=4, a_bits=4, weights="per_channel"))
    save_packed(m, tmp_path / "a.slim")
    again = load_packed(tmp_path / "a.slim", fresh, runtime="fakequant")
    save_packed(again, tmp_path / "b.slim")
    assert (tmp_path / "a.slim").read_bytes() == (tmp_path / "b.slim").read_bytes()
    meta, tensors, _ = read_packed(tmp_path / "a.slim")
    assert meta["state"] == {"F32": [["norm.weight", [8]], ["norm.bias", [8]]]}
    assert torch.equal(tensors["norm.weight"], m.norm.weight)


@pytest.mark.parametrize("cfg", [st.LSQ(w_bits=4, a_bits=4), st.LSQ(w_bits=2, a_bits=2),
                                 st.LSQ(w_bits=8, a_bits=8, weights="per_channel")])
def test_file_size_within_budget(cfg, tmp_path):
    from slimtorch.models import build_model
    m = build_model("mnist_cnn")
    st.quantize_(m, cfg)
    st.calibrate(m, [torch.rand(4, 1, 28, 28)])
    info = save_packed(m, tmp_path / "m.slim")
    assert info["theoretical_bytes"] == st.report(m).totals["bytes"]
    assert info["file_bytes"] <= 1.02 * info["theoretical_bytes"] + 4096
    assert info["file_bytes"] < info["fp32_bytes"] * (cfg.w_bits / 32 + 0.02)


def test_errors_on_save_and_load_arguments(tmp_path):
    m = fresh()
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=4))
    with pytest.raises(ConfigError, match="not initialised"):
        save_packed(m, tmp_path / "m.slim")          # activation quantizers never saw data
    m, _ = quantized(st.LSQ(w_bits=4, a_bits=4))
    save_packed(m, tmp_path / "m.slim")
    with pytest.raises(ConfigError, match="runtime"):
        load_packed(tmp_path / "m.slim", fresh, runtime="gpu")
    with pytest.raises(ConfigError, match="float model"):
        load_packed(tmp_path / "m.slim", m)           # already quantized


def test_reads_version_1_files(tmp_path, monkeypatch):
    """A version-1 file (plain JSON text, one <name>.params tensor per layer, full cost rows) loads
    to the same model and the same report as the version-2 file."""
    import json

    from slimtorch.export import container
    from slimtorch.export.file_report import file_report
    from slimtorch.export.packed import cost_rows
    m, ids = quantized(st.LSQPlus(w_bits=3, a_bits=5, weights="per_channel"))
    with torch.no_grad():
        want = m(ids)
    save_packed(m, tmp_path / "v2.slim")
    meta, split, _ = read_packed(tmp_path / "v2.slim")
    _, raw, _ = container.read_container(tmp_path / "v2.slim")
    tensors = {k: v for k, v in raw.items() if k != "params"}
    tensors.update({f"{e['name']}.params": split[f"{e['name']}.params"] for e in meta["layers"]})
    meta = dict(meta, version=1, costs=cost_rows(meta), theory={k: v for k, v in meta["theory"].items()
                                                                 if k != "params"})
    meta.pop("crc32")
    monkeypatch.setattr(container, "encode_text", lambda d: json.dumps(d, separators=(",", ":")))
    container.write_container(tmp_path / "v1.slim", tensors, meta)
    assert b'\\"version\\":1' in (tmp_path / "v1.slim").read_bytes()
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "v1.slim", fresh)(ids), want)
    r1, r2 = file_report(tmp_path / "v1.slim"), file_report(tmp_path / "v2.slim")
    assert r1.rows == r2.rows and r1.totals["theory_bytes"] == r2.totals["theory_bytes"]


@pytest.mark.parametrize("bits", [4, 2])
def test_resnet20_with_batchnorm_within_budget(bits, tmp_path):
    """Many small layers and BatchNorm statistics: the header stays small and the data section is
    exactly the theoretical size (which counts the running statistics)."""
    from slimtorch.export.file_report import file_report
    from slimtorch.models import build_model
    torch.manual_seed(0)
    m = build_model("resnet20")
    st.quantize_(m, st.LSQ(w_bits=bits, a_bits=bits))
    st.calibrate(m, [torch.randn(4, 3, 32, 32)])
    save_packed(m, tmp_path / "r.slim")
    t = file_report(tmp_path / "r.slim").totals
    assert t["within_limit"] and t["header_bytes"] < 4096
    assert t["file_bytes"] - t["header_bytes"] == t["theory_bytes"]
    assert t["other_file_bytes"] == t["theory_other_bytes"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "r.slim", build_model("resnet20"))(x), m.eval()(x))
