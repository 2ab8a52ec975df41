"""Horizontal fusion of parallel integer GEMMs in an exported ONNX graph.

Linear layers that read the same quantized input (a transformer's Q/K/V projections after
``share_input_quantizers``) become N separate MatMulIntegerToFloat nodes on one uint8 tensor. One
GEMM with the weights concatenated along the output axis, followed by a Split, does the same work
with a wider, more efficient kernel. Per-tensor weight steps are broadcast to per-column steps so
the result is identical."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

OP, DOMAIN = "MatMulIntegerToFloat", "com.microsoft"


def _group_key(node, inits):
    ins = list(node.input) + [""] * (7 - len(node.input))
    if node.op_type != OP or node.domain != DOMAIN or ins[5]:
        return None                      # weight zero points: not fused
    if not all(ins[i] in inits for i in (1, 3)) or (ins[6] and ins[6] not in inits):
        return None
    return ins[0], ins[2], ins[4]


def fuse_parallel_matmuls(model) -> int:
    """Fuse, in place, every group of >= 2 MatMulIntegerToFloat nodes with the same input, input
    scale and zero point and constant weights into one node + Split. Returns how many groups."""
    import onnx
    from onnx import helper, numpy_helper
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    groups = defaultdict(list)
    for node in g.node:
        key = _group_key(node, inits)
        if key is not None:
            groups[key].append(node)
    fused = 0
    for (a, a_scale, a_zp), nodes in groups.items():
        if len(nodes) < 2:
            continue
        arr = lambda name: numpy_helper.to_array(inits[name])  # noqa: E731
        ws = [arr(n.input[1]) for n in nodes]
        if len({w.dtype for w in ws}) != 1 or len({w.shape[0] for w in ws}) != 1:
            continue
        widths = [w.shape[1] for w in ws]
        scales = [np.broadcast_to(arr(n.input[3]).astype(np.float32).reshape(-1), (k,))
                  for n, k in zip(nodes, widths)]
        biases = [arr(n.input[6]).astype(np.float32) if len(n.input) > 6 and n.input[6]
                  else np.zeros(k, np.float32) for n, k in zip(nodes, widths)]
        base = f"{nodes[0].name or nodes[0].output[0]}_fused{fused}"
        new_inits = {f"{base}.W": np.concatenate(ws, axis=1), f"{base}.scale": np.concatenate(scales),
                     f"{base}.bias": np.concatenate(biases),
                     f"{base}.split": np.asarray(widths, dtype=np.int64)}
        g.initializer.extend(numpy_helper.from_array(v, k) for k, v in new_inits.items())
        gemm = helper.make_node(OP, [a, f"{base}.W", a_scale, f"{base}.scale", a_zp, "", f"{base}.bias"],
                                [f"{base}.out"], name=f"{base}.gemm", domain=DOMAIN)
        split = helper.make_node("Split", [f"{base}.out", f"{base}.split"],
                                 [n.output[0] for n in nodes], name=f"{base}.split", axis=-1)
        first = min(list(g.node).index(n) for n in nodes)
        for n in nodes:
            g.node.remove(n)
        g.node.insert(first, split)
        g.node.insert(first, gemm)
        fused += 1
    if fused:
        used = {i for n in g.node for i in n.input}
        keep = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
        onnx.checker.check_model(model)
    return fused
