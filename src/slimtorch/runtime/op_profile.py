"""Where the time goes: per-operator time of an onnxruntime session or a PyTorch callable.

``slimtorch bench FILE --profile`` prints it. For ONNX it reads onnxruntime's own profiler trace
(``SessionOptions.enable_profiling``, a JSON file it writes; parsed with ``json``, deleted after)
and sums each node's kernel time by operator type, after onnxruntime's graph fusions, so it
shows the kernels that really ran (e.g. QAttention, MatMulIntegerToFloat, SkipLayerNormalization).
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path


def _rows(totals: Counter, runs: int, top: int) -> list[tuple[str, float, float]]:
    whole = sum(totals.values()) or 1.0
    return [(op, t / runs, t / whole) for op, t in totals.most_common(top)]


def onnx_op_profile(path, feeds: dict, threads: int = 2, runs: int = 3, top: int = 12) -> list:
    """[(operator type, ms per run, share of kernel time)] for ``runs`` runs of the ONNX model at
    ``path`` on ``feeds`` (after one warm-up run), largest first."""
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)
        for _ in range(runs):
            sess.run(None, feeds)
        trace = json.loads(Path(sess.end_profiling()).read_text())
    return _rows(kernel_ms_after_warmup(trace), runs, top)


def kernel_ms_after_warmup(trace: list) -> Counter:
    """Kernel milliseconds per operator type in an onnxruntime profiler trace, leaving out the
    nodes of the first ``model_run`` (the warm-up)."""
    model_runs = sorted((e for e in trace if e.get("name") == "model_run"), key=lambda e: e["ts"])
    warm_end = model_runs[0]["ts"] + model_runs[0]["dur"] if model_runs else None
    totals: Counter = Counter()
    for e in trace:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and \
                (warm_end is None or e["ts"] >= warm_end):
            totals[e["args"]["op_name"]] += e["dur"] / 1e3
    return totals


def torch_op_profile(fn, runs: int = 3, top: int = 12) -> list:
    """[(operator, ms per run, share of self CPU time)] for ``runs`` calls of ``fn()`` after a warm-up."""
    import torch
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            fn()
    totals: Counter = Counter()
    for ev in prof.key_averages():
        totals[ev.key] += ev.self_cpu_time_total / 1e3
    return _rows(totals, runs, top)


def format_profile(rows: list, title: str) -> str:
    lines = [title, f"{'operator':<36}  {'ms / run':>9}  {'share':>6}"]
    lines += [f"{op[:36]:<36}  {ms:9.2f}  {share:6.1%}" for op, ms, share in rows]
    return "\n".join(lines)
