"""Integer zero points, shared input quantizers and onnxruntime-specific integer kernels
(kernels="ort": MatMulIntegerToFloat with the bias fused)."""
import numpy as np
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.errors import ConfigError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from slimtorch.export.onnx_export import export_onnx, ort_session  # noqa: E402


class Heads(nn.Module):
    """Three projections of one tensor (as Q/K/V), a GELU MLP and a head."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, 8)
        self.up, self.out = nn.Linear(d, 32), nn.Linear(32 + 8, 4)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1) @ x
        h = torch.nn.functional.gelu(self.up(a))
        return self.out(torch.cat([h, self.v(x)], -1))


def _model(cfg, share):
    torch.manual_seed(0)
    m = Heads()
    st.quantize_(m, cfg)
    x = torch.randn(8, 5, 16)
    groups = st.share_input_quantizers(m, lambda mm: mm(x)) if share else []
    st.calibrate(m, [x])
    return m.eval(), x, groups


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_share_input_quantizers_groups_and_calibrates_once():
    m, x, groups = _model(st.LSQPlus(w_bits=8, a_bits=8), share=True)
    assert groups == [["q", "k", "v"]]
    assert m.q.input_quantizer is m.k.input_quantizer is m.v.input_quantizer
    assert m.up.input_quantizer is not m.q.input_quantizer
    assert m.q.input_quantizer.initialized
    with pytest.raises(ConfigError, match="no layer has an input quantizer"):
        st.share_input_quantizers(nn.Sequential(nn.Linear(2, 2)), lambda mm: mm(torch.randn(1, 2)))


def test_share_skips_groups_with_different_bits():
    torch.manual_seed(0)
    m = Heads()
    st.quantize_(m, st.LSQ(w_bits=8, a_bits=8), plan={"k": {"a_bits": 4}})
    assert st.share_input_quantizers(m, lambda mm: mm(torch.randn(2, 5, 16))) == []
    assert not m.q.input_quantizer.initialized     # probing does not initialise anything


@pytest.mark.parametrize("kernels", ["qdq", "ort"])
def test_integer_zero_point_export_has_no_offset_arithmetic(kernels, tmp_path):
    # 7-bit weights: MSE-fitted 8-bit weights reach -128/127, and x86 without VNNI saturates u8 x s8
    # pair sums in onnxruntime's kernels (see _int8_dot_saturates); 7 bits is exact on every CPU
    m, x, _ = _model(st.LSQPlus(w_bits=7, a_bits=8, integer_offset=True, weights="per_channel"), share=True)
    path = export_onnx(m, tmp_path / "m.onnx", (x[:2],), input_names=["x"], kernels=kernels)
    ops = _ops(path)
    assert "Sub" not in ops and ops.count("QuantizeLinear") == 3     # x (q/k/v share it), a, cat
    with torch.no_grad():
        want = m(x).numpy()
    got = ort_session(path, optimization="none" if kernels == "qdq" else "all").run(None, {"x": x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    if kernels == "ort":
        assert ops.count("MatMulIntegerToFloat") == 5 and "DequantizeLinear" not in ops


def test_ort_kernels_equal_qdq_kernels_in_onnxruntime(tmp_path):
    m, x, _ = _model(st.LSQPlus(w_bits=4, a_bits=8), share=False)      # float offsets folded
    a = export_onnx(m, tmp_path / "a.onnx", (x[:2],), input_names=["x"])
    b = export_onnx(m, tmp_path / "b.onnx", (x[:2],), input_names=["x"], kernels="ort")
    ra = ort_session(a).run(None, {"x": x.numpy()})[0]
    rb = ort_session(b).run(None, {"x": x.numpy()})[0]
    assert np.abs(ra - rb).max() <= 1e-5 * np.abs(ra).max()
    with pytest.raises(ConfigError, match="kernels"):
        export_onnx(m, tmp_path / "c.onnx", (x[:2],), kernels="tensorrt")


def _int8_dot_saturates() -> bool:
    """x86 without VNNI runs onnxruntime's u8 x s8 GEMMs with vpmaddubsw, whose int16 pair sums
    saturate for full 8-bit weights (the documented workaround is 7-bit weights)."""
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return True
    return not any(f in flags for f in (" avx512_vnni", " avx_vnni", " amx_int8"))


@pytest.mark.parametrize("attn,w_bits", [("eager", 8), ("sdpa", 7)])   # additive float mask / bool mask
def test_bert_self_attention_fused_into_qattention(attn, w_bits, tmp_path):
    transformers = pytest.importorskip("transformers")
    from slimtorch.export.modelspec import HFEncoder
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, attn_implementation=attn)
    torch.manual_seed(0)
    m = transformers.BertModel(cfg).eval()
    st.quantize_(m, st.LSQPlus(w_bits=w_bits, a_bits=8, integer_offset=True, weights="per_channel"),
                 exclude=["*embeddings*", "pooler*"])
    ids = torch.randint(0, 100, (6, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[4, 3:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    assert len(st.share_input_quantizers(m, lambda mm: mm(**feeds))) == 2
    st.calibrate(m, lambda mm: mm(**feeds))
    ex = {k: v[:2] for k, v in feeds.items()}
    dyn = {k: {0: torch.export.Dim("b"), 1: torch.export.Dim("s", min=2, max=32)} for k in ex}
    path = export_onnx(HFEncoder(m), tmp_path / "m.onnx", ex, dynamic_shapes=dyn, kernels="ort")
    ops = _ops(path)
    assert ops.count("QAttention") == 2 and "Softmax" not in ops
    with torch.no_grad():
        want = m(**feeds).last_hidden_state.numpy()
    sess = ort_session(path)
    got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    real = mask.bool().numpy()                                   # padded positions carry no meaning
    tol = 1e-2 if w_bits == 8 and _int8_dot_saturates() else 1e-3
    assert np.abs(got - want)[real].max() <= tol * np.abs(want).max()
    other = ids.clone()
    other[~mask.bool()] = 7                                      # new tokens under the padding
    moved = sess.run(None, {"input_ids": other.numpy(), "attention_mask": mask.numpy()})[0]
    assert np.abs(moved - got)[real].max() <= 1e-5 * np.abs(want).max()
    plain = export_onnx(HFEncoder(m), tmp_path / "p.onnx", ex, dynamic_shapes=dyn)   # qdq: no fusion
    assert "QAttention" not in _ops(plain)


def test_causal_self_attention_is_not_fused(tmp_path):
    transformers = pytest.importorskip("transformers")
    from slimtorch.export.modelspec import HFEncoder
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, attn_implementation="eager",
                                  is_decoder=True)
    torch.manual_seed(0)
    m = transformers.BertModel(cfg).eval()
    st.quantize_(m, st.LSQPlus(w_bits=8, a_bits=8, integer_offset=True), exclude=["*embeddings*", "pooler*"])
    feeds = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    st.share_input_quantizers(m, lambda mm: mm(**feeds))
    st.calibrate(m, lambda mm: mm(**feeds))
    path = export_onnx(HFEncoder(m), tmp_path / "m.onnx", feeds, dynamic_shapes=None, kernels="ort")
    assert "QAttention" not in _ops(path)
    with torch.no_grad():
        want = m(**feeds).last_hidden_state.numpy()
    got = ort_session(path).run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()


def test_shared_input_quantizer_survives_packed_reload(tmp_path):
    from slimtorch.export import load_packed, save_packed
    m, x, _ = _model(st.LSQPlus(w_bits=4, a_bits=8, integer_offset=True), share=True)
    save_packed(m, tmp_path / "m.slim")
    r = load_packed(tmp_path / "m.slim", Heads, runtime="fakequant")
    assert r.q.input_quantizer is r.k.input_quantizer is r.v.input_quantizer
    assert r.up.input_quantizer is not r.q.input_quantizer
    with torch.no_grad():
        assert torch.equal(r(x), m(x))


@pytest.mark.parametrize("a_bits", [3, 5])
def test_integer_zero_point_below_8_bits_matches_the_graph(a_bits, tmp_path):
    m, x, _ = _model(st.LSQPlus(w_bits=4, a_bits=a_bits, integer_offset=True), share=False)
    assert any(q.quant_params()["q_n"] < 0 for q in (m.q.input_quantizer, m.up.input_quantizer, m.out.input_quantizer))
    path = export_onnx(m, tmp_path / "m.onnx", (x[:2],), input_names=["x"])
    assert "Clip" in _ops(path) and "Sub" not in _ops(path)
    with torch.no_grad():
        want = m(x).numpy()
    got = ort_session(path, optimization="none").run(None, {"x": x.numpy()})[0]   # the graph as written
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
