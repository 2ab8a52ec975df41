"""Issue 5 benchmark: HAWQ-V2 allocation quality (papers.md Sec. 3e). Bits {2, 4, 8}, byte budgets
equal to ~3 and ~2.5 average weight bits; HAWQ vs uniform vs NNCF's monotone plan vs 10 random plans
at (nearly) equal bytes, after PTQ (per-tensor, MSE step) and after the same short LSQ+ QAT; Spearman
of sum Omega vs accuracy drop. Activations at 8 bits everywhere (weight allocation only).

    PYTHONPATH=src python -m benchmarks.hawq_alloc --model mnist1d   # or --model mnist
"""
from __future__ import annotations

import argparse
import copy
import itertools
import os
import random
import statistics
import time

import torch
from scipy.stats import spearmanr
from torch.utils.data import TensorDataset

import slimtorch as st
from slimtorch.data import make_loader
from slimtorch.search.budget import model_costs
from slimtorch.search.hawq import HAWQConfig, _effective, hawq_search, weight_perturbation
from slimtorch.search.hessian import hutchinson_traces
from slimtorch.train import TrainConfig, train

from .common import accuracy, float_model
from .results import write_section

SETUPS = {  # float training as in benchmarks/lsq_qat.py (shares its cache); short QAT
    "mnist1d": dict(model="mnist1d_cnn", dataset="mnist1d", label="mnist1d CNN",
                    float=TrainConfig(epochs=150, lr=1e-2, batch_size=100, progress=False),
                    qat=TrainConfig(epochs=3, lr=2e-3, batch_size=100, progress=False), qat_samples=None),
    "mnist": dict(model="mnist_cnn", dataset="mnist", label="MNIST CNN",
                  float=TrainConfig(epochs=2, lr=1e-3, batch_size=64, progress=False),
                  qat=TrainConfig(epochs=1, lr=5e-4, batch_size=64, progress=False), qat_samples=6000),
}
# PTQ: per-tensor symmetric weights with the MSE-optimal step (min-max leaves 2-bit layers at chance:
# with levels {-2..1} x max|w| almost every weight rounds to 0); the same quantizer measures Omega.
W_INIT = "mse"
PTQ = st.LSQ(w_bits=4, a_bits=8, w_init=W_INIT, a_init="minmax")
QAT = st.LSQPlus(w_bits=4, a_bits=8)


def plan_bytes(net, plan, quant=PTQ):
    return model_costs(st.quantize_(copy.deepcopy(net), quant, plan=plan))["bytes"]


def evaluate_plan(net, plan, tr, te, qat_loader, qat_cfg):
    """(PTQ accuracy, accuracy after the short QAT) of ``plan`` (seeded: calibration samples too)."""
    torch.manual_seed(0)
    m = st.quantize_(copy.deepcopy(net), PTQ, plan=plan)
    st.calibrate(m, tr.batches(0), num_batches=8)
    ptq = accuracy(m, te)
    m = st.quantize_(copy.deepcopy(net), QAT, plan=plan)
    st.calibrate(m, tr.batches(0), num_batches=8)
    train(m, qat_loader.batches, qat_cfg)
    return ptq, accuracy(m, te)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(SETUPS), default="mnist1d")
    ap.add_argument("--random", type=int, default=10)
    ap.add_argument("--max-iter", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="1 avoids OpenMP thrashing on a shared box")
    ap.add_argument("--targets", default="4,3,2.5", help="approximate average bits of the budgets")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = SETUPS[args.model]
    t_start, load_start = time.time(), os.getloadavg()[0]
    net, bundle, tr, te = float_model(s["model"], s["dataset"], s["float"])
    fp32 = accuracy(net, te)
    qds = bundle.train if s["qat_samples"] is None else TensorDataset(*(t[:s["qat_samples"]] for t in bundle.train.tensors))
    qat_loader = make_loader(qds, s["qat"].batch_size, seed=0)
    hess_batches = list(itertools.islice(iter(make_loader(bundle.train, 256, seed=1)), 4))
    t = time.perf_counter()
    traces = hutchinson_traces(net, hess_batches, max_iter=args.max_iter, tol=1e-3, progress=False)
    t_trace = time.perf_counter() - t
    names = list(traces.traces)
    weights = {n: net.get_submodule(n).weight for n in names}
    pert = {(n, b): weight_perturbation(weights[n], b, W_INIT) for n in names for b in (2, 3, 4, 8)}

    def omega(plan):
        return sum(_effective(traces.traces[n], "clamp") * pert[(n, plan[n]["w_bits"])] for n in names)

    uni = {b: {n: {"w_bits": b} for n in names} for b in (2, 3, 4)}
    ub = {b: plan_bytes(net, p) for b, p in uni.items()}
    every = [dict(zip(names, ({"w_bits": b} for b in bits))) for bits in itertools.product((2, 4, 8), repeat=len(names))]
    every_bytes = [plan_bytes(net, p) for p in every]
    rows, points, summary = [], {}, []
    budgets = {"4": ub[4], "3": ub[3], "2.5": (ub[2] + ub[3]) // 2}
    cache = {}

    def run_plan(plan):
        key = tuple(plan[n]["w_bits"] for n in names)
        if key not in cache:
            cache[key] = evaluate_plan(net, plan, tr, te, qat_loader, s["qat"])
        return cache[key]
    for label in args.targets.split(","):
        target = budgets[label]
        res = hawq_search(net, hess_batches, HAWQConfig(budget="bytes", target=target, w_init=W_INIT), quant=PTQ,
                          traces=traces, progress=False)
        feas = sorted(((b, i) for i, b in enumerate(every_bytes) if b <= target), reverse=True)
        near = [i for b, i in feas if b >= 0.85 * target]
        pool = [every[i] for i in (near if len(near) >= 3 else [i for _, i in feas[:10]])]
        rng = random.Random(0)
        rand = [rng.choice(pool) for _ in range(args.random)]
        cands = [("HAWQ-V2 (exact)", res.plan)]
        if label != "4":  # with 3 in the grid, uniform 3-bit is a candidate plan of the search
            r3 = hawq_search(net, hess_batches, HAWQConfig(bits=(2, 3, 4, 8), budget="bytes", target=target,
                                                           w_init=W_INIT), quant=PTQ, traces=traces, progress=False)
            cands.append(("HAWQ-V2, bits {2,3,4,8}", r3.plan))
        if res.monotone is not None:
            cands.append(("monotone (NNCF)", res.monotone["plan"]))
        cands += [(f"uniform {b}-bit", uni[b]) for b in {"4": (4,), "3": (3,), "2.5": (2, 3)}[label]]
        cands += [(f"random #{i}", p) for i, p in enumerate(rand)]
        accs = {}
        for name, plan in cands:
            ptq, qat = run_plan(plan)
            accs[name] = (ptq, qat)
            b, o = plan_bytes(net, plan), omega(plan)
            points[tuple(plan[n]["w_bits"] for n in names)] = (label, o, fp32 - ptq, fp32 - qat)
            if not name.startswith("random"):
                bits = "/".join(str(plan[n]["w_bits"]) for n in names)
                rows.append(f"| {label} | {name} | {bits} | {b:,} | {o:.3e} | {ptq:.2f} | {qat:.2f} |")
        rp = [accs[f"random #{i}"] for i in range(args.random)]
        rb = statistics.mean(plan_bytes(net, p) for p in rand)
        rows.append(f"| {label} | mean of {args.random} random (largest-bytes feasible plans) | - | {rb:,.0f} | "
                    f"{statistics.mean(omega(p) for p in rand):.3e} | {statistics.mean(a for a, _ in rp):.2f} | "
                    f"{statistics.mean(b for _, b in rp):.2f} |")
        rm = (statistics.mean(a for a, _ in rp), statistics.mean(b for _, b in rp))
        parts = [f"{k} {v[0]:.2f} / {v[1]:.2f}" for k, v in accs.items()
                 if k.startswith(("HAWQ", "uniform"))] + [f"random mean {rm[0]:.2f} / {rm[1]:.2f}"]
        summary.append(f"~{label} bits (budget {target:,} B), PTQ / QAT accuracy (%): " + "; ".join(parts))
    pts = list(points.values())
    rho_ptq = spearmanr([p[1] for p in pts], [p[2] for p in pts]).statistic
    rho_qat = spearmanr([p[1] for p in pts], [p[3] for p in pts]).statistic
    tr_txt = ", ".join(f"{n} {traces.traces[n]:.2e}" for n in names)
    body = "\n".join([
        f"{s['label']}: FP32 {fp32:.2f}% (trained {s['float'].epochs} epochs). Hutchinson traces on 4 x 256 "
        f"training samples: {traces.iterations} iterations, {t_trace:.1f} s; average traces {tr_txt}. "
        f"Budget = model bytes (budget.model_costs, per-tensor W, 8-bit A) of uniform 4-bit, of uniform "
        f"3-bit, and halfway between uniform 2- and 3-bit (~2.5 bits); candidate bits {{2, 4, 8}} (so "
        f"uniform 3-bit is off the grid and holds more bytes than any grid plan under its budget). PTQ: "
        f"per-tensor MSE-optimal weight steps (also used for Omega), calibrated 8-bit min-max activations, "
        f"no training. QAT: LSQ+ (8-bit A), {s['qat'].epochs} "
        f"epoch(s) on {len(qds)} samples. Bits column: {'/'.join(names)}.", "",
        "| ~bits | plan | bits | bytes | sum Omega | PTQ acc. (%) | QAT acc. (%) |",
        "| --- | --- | --- | --- | --- | --- | --- |", *rows, "",
        *[f"- {x}" for x in summary],
        f"- Spearman(sum Omega, accuracy drop) over the {len(pts)} distinct plans evaluated: PTQ {rho_ptq:.2f}, "
        f"after QAT {rho_qat:.2f}.",
        f"- Wall time {time.time() - t_start:.0f} s; load average {load_start:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end.",
    ])
    write_section(f"HAWQ-V2 allocation: {s['label']} (issue 5)", body)
    print(body)


if __name__ == "__main__":
    main()
