"""Per-operator time of an onnxruntime session and of a PyTorch callable (``bench --profile``)."""
import numpy as np
import pytest
import torch

from slimtorch.runtime.op_profile import (format_profile, kernel_ms_after_warmup, onnx_op_profile,
                                          torch_op_profile)


def test_onnx_op_profile_sums_kernel_time_by_operator(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Sigmoid", ["h"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    rows = onnx_op_profile(path, {"x": np.ones((256, 64), np.float32)}, threads=1, runs=2)
    ops = {op for op, *_ in rows}
    assert ops == {"MatMul", "Sigmoid"}
    assert all(ms >= 0 for _, ms, _ in rows) and sum(s for *_, s in rows) == pytest.approx(1.0)
    text = format_profile(rows, "title")
    assert text.splitlines()[0] == "title" and "MatMul" in text


def test_torch_op_profile_names_aten_operators():
    lin = torch.nn.Linear(32, 32)
    x = torch.randn(64, 32)
    rows = torch_op_profile(lambda: lin(x), runs=2, top=50)
    assert any("addmm" in op or "linear" in op for op, *_ in rows)
    assert rows == sorted(rows, key=lambda r: -r[1])


def test_warmup_nodes_are_left_out():
    node = lambda op, ts, dur: {"cat": "Node", "name": f"n_{op}_kernel_time", "ts": ts, "dur": dur,   # noqa: E731
                                "args": {"op_name": op}}
    trace = [{"cat": "Session", "name": "model_run", "ts": 100, "dur": 50},   # warm-up: 100..150
             node("MatMul", 110, 7000), node("Relu", 140, 9000),               # inside it: left out
             {"cat": "Session", "name": "model_run", "ts": 200, "dur": 50},
             node("MatMul", 210, 2000), node("Relu", 230, 500), node("Relu", 240, 1500),
             {"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 5}]
    assert kernel_ms_after_warmup(trace) == {"MatMul": 2.0, "Relu": 2.0}
