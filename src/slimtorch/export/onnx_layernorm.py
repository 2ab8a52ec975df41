"""Keep onnxruntime's CPU on its fast LayerNormalization kernel (an exact ONNX graph rewrite).

onnxruntime's session optimizer fuses ``Add -> LayerNormalization`` (the residual connection
of every post-LN transformer block) into com.microsoft SkipLayerNormalization. On the CPU that
kernel is a scalar loop with one division per element, several times slower than the unfused
Add + LayerNormalization kernels (onnxruntime 1.32, 2 threads, MiniLM at batch 32: the profiler
line under the MiniLM table of ``benchmarks/RESULTS.md``, written by ``benchmarks/export_speed.py``).

The fusion matches an Add (of two 3-D tensors) that feeds the LayerNormalization directly and
nothing else. This rewrite runs the normalization on the rows instead, for every such Add -> LN
over the last axis whatever the shapes (a few it touches, such as a 2-D one, would not have
been fused; the rewrite is exact for them too and costs two views and a Shape):

    Add(a, b) -> Reshape([-1, D]) -> LayerNormalization(axis=-1) -> Reshape(Shape(sum))

Same arithmetic, bit for bit (LayerNormalization normalizes each row of the last axis either
way); both Reshapes are views. Standard ONNX, so any runtime runs the result. For GPU execution
providers, whose SkipLayerNormalization is fast, pass ``export_onnx(..., fuse_skip_layernorm=True)``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _last_axis(node) -> bool:
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    return axis == -1


def _names(g) -> set[str]:
    """Every tensor and node name of the graph, to keep generated names unique."""
    return ({x for n in g.node for x in (*n.input, *n.output, n.name)} | {t.name for t in g.initializer}
            | {v.name for v in (*g.input, *g.output, *g.value_info)})


def unfuse_skip_layernorm(model) -> int:
    """Rewrite, in place, every ``Add -> LayerNormalization`` of an ``onnx.ModelProto`` that
    onnxruntime would fuse into SkipLayerNormalization (see the module docstring); returns how
    many were rewritten. Only LayerNormalizations over the last axis with a constant 1-D scale
    of length > 1 (its length is the row width; a length-1 scale broadcasts, so it gives none),
    no Mean/InvStdDev output, and a sum used nowhere else are touched; anything else
    (subgraphs included) is left alone."""
    from onnx import helper, numpy_helper
    g = model.graph
    feeds = {i.name for i in g.input}                   # an initializer that is an input can be fed
    inits = {t.name: t for t in g.initializer if t.name not in feeds}
    producer = {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    graph_outputs = {o.name for o in g.output}
    taken, count = _names(g), 0
    before, after = {}, {}
    for k, ln in enumerate(g.node):
        if ln.op_type != "LayerNormalization" or ln.domain not in ("", "ai.onnx") or any(ln.output[1:]):
            continue
        add = producer.get(ln.input[0])
        scale = inits.get(ln.input[1]) if len(ln.input) > 1 else None
        if (add is None or add.op_type != "Add" or uses.get(ln.input[0]) != 1
                or ln.input[0] in graph_outputs or scale is None or len(scale.dims) != 1
                or scale.dims[0] < 2 or not _last_axis(ln)):
            continue
        while any(t.startswith(f"slimtorch_ln{count}_") for t in taken):
            count += 1
        x, y, tag = ln.input[0], ln.output[0], f"slimtorch_ln{count}"
        count += 1
        width = numpy_helper.from_array(np.array([-1, scale.dims[0]], np.int64), f"{tag}_rows_shape")
        g.initializer.append(width)
        before[k] = [helper.make_node("Reshape", [x, width.name], [f"{tag}_rows"], name=f"{tag}_to_rows"),
                     helper.make_node("Shape", [x], [f"{tag}_shape"], name=f"{tag}_shape")]
        ln.input[0], ln.output[0] = f"{tag}_rows", f"{tag}_normed_rows"
        # allowzero: Shape(x) holds a 0 where x is empty, which must stay 0, not copy a row dim
        after[k] = [helper.make_node("Reshape", [f"{tag}_normed_rows", f"{tag}_shape"], [y],
                                     name=f"{tag}_from_rows", allowzero=1)]
    if not before:
        return 0
    nodes = []
    for k, n in enumerate(g.node):
        nodes += before.get(k, []) + [n] + after.get(k, [])
    del g.node[:]
    g.node.extend(nodes)
    return len(before)


def unfuse_skip_layernorm_file(path) -> int:
    """:func:`unfuse_skip_layernorm` on an ONNX file (rewritten in place, atomically); e.g. to give
    onnxruntime's own ``quantize_dynamic`` output the same LayerNorm kernels in a comparison."""
    import onnx
    from ..atomic import atomic_write_bytes
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)   # external tensors stay where they are
    n = unfuse_skip_layernorm(model)
    if n:
        atomic_write_bytes(path, model.SerializeToString())
    return n
