"""The residual Add -> LayerNormalization rewrite that keeps onnxruntime off SkipLayerNormalization."""
import numpy as np
import pytest
import torch

import slimtorch as st

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from slimtorch.export.onnx_export import export_onnx  # noqa: E402
from slimtorch.export.onnx_layernorm import unfuse_skip_layernorm, unfuse_skip_layernorm_file  # noqa: E402

D = 8


def _graph(axis=-1, scale_const=True, add_uses=1, scale_len=D, ln_outs=("ln",), sum_output=False,
           x="x", r="r"):
    """x, r: [b, s, D] -> Add -> LayerNormalization(axis) (-> + an extra use of the sum)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=D).astype(np.float32), "beta")]
    nodes = [helper.make_node("Add", [x, r], ["sum"])]
    if scale_const:
        inits.append(numpy_helper.from_array(rng.normal(size=scale_len).astype(np.float32), "gamma"))
        scale = "gamma"
    else:                                                   # scale computed in the graph
        inits.append(numpy_helper.from_array(np.array([0, 1], np.int64), "axes"))     # an input since opset 18
        nodes.append(helper.make_node("ReduceMean", [r, "axes"], ["scale"], keepdims=0))
        scale = "scale"
    ln_in = "sum"
    nodes.append(helper.make_node("LayerNormalization", [ln_in, scale, "beta"], list(ln_outs), axis=axis,
                                  epsilon=1e-5))
    outs = ["ln"] + ["sum"] * sum_output
    if add_uses == 2:
        nodes.append(helper.make_node("Neg", ["sum"], ["neg"]))
        outs.append("neg")
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", D])   # noqa: E731
    g = helper.make_graph(nodes, "g", [vi(x), vi(r)], [vi(o) for o in outs], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _run(model, level, shape=(3, 5, D)):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = {i.name: rng.normal(size=shape).astype(np.float32) for i in sess.get_inputs()}
    return sess.run(None, feeds)[0]


def _optimized_ops(model, tmp_path):
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


def test_rewrite_is_exact_and_onnxruntime_no_longer_fuses(tmp_path):
    m = _graph()
    assert "SkipLayerNormalization" in _optimized_ops(m, tmp_path)           # what we avoid
    want = _run(m, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)               # plain Add + LayerNorm
    assert unfuse_skip_layernorm(m) == 1
    onnx.checker.check_model(m)
    ops = [n.op_type for n in m.graph.node]
    assert ops == ["Add", "Reshape", "Shape", "LayerNormalization", "Reshape"]
    assert "SkipLayerNormalization" not in _optimized_ops(m, tmp_path)
    got = _run(m, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert got.shape == want.shape and np.array_equal(got, want)             # bit for bit
    assert unfuse_skip_layernorm(m) == 0                                     # idempotent


@pytest.mark.parametrize("kw", [{"axis": 1}, {"axis": 2}, {"scale_const": False}, {"add_uses": 2},
                                {"sum_output": True}, {"scale_len": 1}, {"ln_outs": ("ln", "mean", "inv_std")}])
def test_rewrite_leaves_other_layernorms_alone(kw):
    m = _graph(**kw)
    _run(m, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)                     # a valid model
    before = [n.op_type for n in m.graph.node]
    assert unfuse_skip_layernorm(m) == 0
    assert [n.op_type for n in m.graph.node] == before


def test_file_rewrite(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_graph(), str(path))
    assert unfuse_skip_layernorm_file(path) == 1
    assert "Reshape" in [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("kw", [{"ln_outs": ("ln", "", "")}, {"x": "slimtorch_ln0_rows", "r": "slimtorch_ln1_rows"}])
def test_rewrite_unused_optional_outputs_and_taken_names(kw):
    m = _graph(**kw)
    want = _run(m, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert unfuse_skip_layernorm(m) == 1
    onnx.checker.check_model(m, full_check=True)
    assert np.array_equal(_run(m, ort.GraphOptimizationLevel.ORT_ENABLE_ALL), want)


@pytest.mark.parametrize("shape", [(0, 5, D), (3, 0, D)])
def test_rewrite_keeps_empty_shapes(shape):
    m, ref = _graph(), _graph()
    unfuse_skip_layernorm(m)
    want = _run(ref, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, shape)
    got = _run(m, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, shape)
    assert got.shape == want.shape == shape and np.array_equal(got, want)


def test_file_rewrite_keeps_external_data(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_graph(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    want = _run(onnx.load(str(path)), ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert unfuse_skip_layernorm_file(path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.data", "m.onnx"]
    inline = {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer if not t.external_data}
    assert inline == {"slimtorch_ln0_rows_shape"}                            # gamma, beta still in m.data
    assert np.array_equal(_run(onnx.load(str(path)), ort.GraphOptimizationLevel.ORT_ENABLE_ALL), want)


def test_export_of_a_bert_encoder_keeps_layernorm_unfused(tmp_path):
    transformers = pytest.importorskip("transformers")
    from slimtorch.export.modelspec import HFEncoder
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, attn_implementation="eager")
    torch.manual_seed(0)
    m = transformers.BertModel(cfg).eval()
    st.quantize_(m, st.LSQ(w_bits=8, a_bits=8), exclude=["*embeddings*", "pooler*"])
    feeds = {"input_ids": torch.randint(0, 50, (4, 10)), "attention_mask": torch.ones(4, 10, dtype=torch.long)}
    st.calibrate(m, lambda mm: mm(**feeds))
    with torch.no_grad():
        want = m(**feeds).last_hidden_state.numpy()
    outs = {}
    for fuse in (False, True):
        path = export_onnx(HFEncoder(m), tmp_path / f"m{fuse}.onnx", feeds, kernels="ort", fuse_skip_layernorm=fuse)
        model = onnx.load(str(path))
        ops = _optimized_ops(model, tmp_path)
        assert ("SkipLayerNormalization" in ops) == fuse
        outs[fuse] = _run_feeds(path, feeds)
    assert ops.count("SkipLayerNormalization") == 4                          # 2 per block
    for got in outs.values():
        assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()
    # bit for bit what onnxruntime computes on the same graph with only that fusion turned off
    assert np.array_equal(outs[False], _run_feeds(tmp_path / "mTrue.onnx", feeds, ["SkipLayerNormFusion"]))


def _run_feeds(path, feeds, disabled_optimizers=None):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled_optimizers)
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


def test_cli_and_recipe_pass_fuse_skip_layernorm(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from slimtorch import pipeline
    from slimtorch.cli import main
    from slimtorch.export import onnx_export, save_packed
    from slimtorch.export.modelspec import zoo_spec
    from slimtorch.models import build_model
    seen = []

    class Called(Exception):
        pass

    def spy(*a, **kw):
        seen.append(kw.get("fuse_skip_layernorm"))
        raise Called                                                        # stop after the call

    monkeypatch.setattr(onnx_export, "export_onnx", spy)
    monkeypatch.setattr(pipeline, "export_onnx", spy)
    m = build_model("mnist_cnn")
    st.quantize_(m, st.LSQ(w_bits=8, a_bits=8))
    st.calibrate(m, [torch.rand(2, 1, 28, 28)])
    save_packed(m, tmp_path / "m.slim", build=zoo_spec("mnist_cnn"))
    for flag in ([], ["--fuse-skip-layernorm"]):
        with pytest.raises(Called):
            main(["export", str(tmp_path / "m.slim"), "--onnx", str(tmp_path / "m.onnx"), *flag])
    for export in ({"onnx": "m.onnx"}, {"onnx": "m.onnx", "onnx_fuse_skip_layernorm": True}):
        with pytest.raises(Called):
            pipeline._export(m, tmp_path, SimpleNamespace(export=export), None)
    assert seen == [False, True, False, True]
