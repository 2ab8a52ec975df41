"""Issue 13 benchmark 1: Quant-Noise + iPQ on the MNIST CNN and the mnist1d CNN (Fan, Stock et al.,
ICLR 2021, Table 1's iPQ rows at small scale; papers.md Sec. 6e).

Each network is trained from scratch (Adam, linear decay) five ways, 3 seeds each:
  none         no noise
  QAT p=1      exact PQ noise (``QuantNoise(mode="pq_exact", p=1)``): every block replaced by its
               nearest centroid, straight-through; k-means refit every ``update_every`` steps at the
               codebook size of the middle operating point (``qat_k``)
  QN p         Quant-Noise, block dropping (``mode="pq"``) at p = 0.05, 0.1, 0.2
with the noise on the layers iPQ quantizes, on the same blocks. Then iPQ (noise removed): stage 1
the convolutions, stage 2 the linear layers (``st.pq_`` per layer, then ``st.pq_param_groups``
fine-tuning of the centroids and the weights not yet quantized, ``ft_steps`` per stage), at three
operating points (centroids per layer, int8 centroids). Size: FP32 bytes / packed bytes, from the cost
module (``model_costs``) and from the real file (``save_packed``). Accuracy on the held-out test
split; drop = FP32 accuracy of the un-noised network (mean over seeds) - iPQ accuracy.

    PYTHONPATH=src python -m benchmarks.pq_ipq [--quick] [--seeds 3]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import slimtorch as st
from slimtorch.cost import model_costs
from slimtorch.data import load_dataset
from slimtorch.models import build_model

from .common import acc, batches
from .results import write_section

CACHE = Path("runs/bench-cache")
FIG = Path(__file__).with_name("figures") / "pq_ipq.png"
NAME = "Quant-Noise + iPQ: MNIST CNN and mnist1d CNN (issue 13)"
VARIANTS = ["none", "QAT p=1", "QN p=0.05", "QN p=0.1", "QN p=0.2"]
GOAL_RATIO, GOAL_DROP = 20.0, 1.0


def _pq(k: int, d: int | None = None, seed: int = 0) -> st.PQ:
    return st.PQ(n_centroids=k, block_size=d, n_iter=20, seed=seed, int8_centroids=True)


# Per setup: layers with their block size (None: the layer kind's default), the stages, and the
# operating points (K per layer; a small layer gets fewer centroids than its blocks).
SETUPS = {
    "mnist": dict(label="MNIST CNN", model="mnist_cnn", kwargs={"input_size": 14}, data="mnist",
                  steps=800, lr=1e-3, bs=64, ft_steps=150, ft_lr=2e-3, qat_k=0,
                  blocks={"conv1": None, "conv2": None, "fc1": None, "fc2": None},
                  stages=(("conv1", "conv2"), ("fc1", "fc2")),
                  points=({"conv1": 16, "conv2": 128, "fc1": 128, "fc2": 16},
                          {"conv1": 16, "conv2": 64, "fc1": 64, "fc2": 16},
                          {"conv1": 8, "conv2": 16, "fc1": 16, "fc2": 8})),
    "mnist1d": dict(label="mnist1d CNN", model="mnist1d_cnn", kwargs={}, data="mnist1d",
                    steps=1500, lr=1e-2, bs=100, ft_steps=100, ft_lr=2e-3, qat_k=1,
                    blocks={"conv2": 5, "conv3": 5, "linear": 5},
                    stages=(("conv2", "conv3"), ("linear",)),
                    points=({"conv2": 128, "conv3": 128, "linear": 64},
                            {"conv2": 32, "conv3": 32, "linear": 32},
                            {"conv2": 8, "conv3": 8, "linear": 8})),
}


def load(setup: dict, quick: bool):
    """(x, y, x_test, y_test): MNIST average-pooled to 14 x 14 (the 2-core budget), mnist1d as generated."""
    opts = {"limit_train": 6000, "limit_test": 2000} if quick and setup["data"] == "mnist" else {}
    b = load_dataset(setup["data"], **opts)
    (x, y), (xt, yt) = b.train.tensors, b.test.tensors
    if setup["data"] == "mnist":
        x, xt = F.avg_pool2d(x, 2), F.avg_pool2d(xt, 2)
    return x, y, xt, yt


def fit(model, data, steps: int, lr: float, bs: int, seed: int, groups=None) -> None:
    """Adam with linear decay for ``steps`` steps; ``st.step`` after each (pq_exact refits)."""
    opt = torch.optim.Adam(groups if groups is not None else model.parameters(), lr=lr)
    base = [g["lr"] for g in opt.param_groups]
    it = batches(data[0], data[1], bs, seed)
    model.train()
    for s in range(steps):
        xb, yb = next(it)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g, b0 in zip(opt.param_groups, base):
            g["lr"] = b0 * (1 - s / steps)
        opt.step()
        st.step(model)


def attach_noise(model, setup: dict, variant: str) -> None:
    """The variant's noise on the layers iPQ will quantize, on the same blocks (QAT: at the middle
    operating point's K)."""
    if variant == "none":
        return
    for layer, d in setup["blocks"].items():
        if variant.startswith("QAT"):
            k = setup["points"][setup["qat_k"]][layer]
            cfg = st.QuantNoise(mode="pq_exact", p=1.0, block_size=d, n_centroids=k, update_every=100)
        else:
            cfg = st.QuantNoise(mode="pq", p=float(variant.split("=")[1]), block_size=d)
        st.quant_noise_(model, cfg, include=layer)


def ipq(net, setup: dict, point: dict, data, seed: int, steps: int):
    """iPQ of a copy of ``net`` at ``point``: per stage pq_ of its layers, then fine-tuning."""
    m = copy.deepcopy(net)
    for i, stage in enumerate(setup["stages"]):
        for layer in stage:
            st.pq_(m, _pq(point[layer], setup["blocks"][layer], seed), include=layer)
        if steps:
            fit(m, data, steps, setup["ft_lr"], setup["bs"], seed + 100 * (i + 1),
                groups=st.pq_param_groups(m, lr=setup["ft_lr"]))
    return m


def sizes(m, fp32: int) -> dict:
    cost = model_costs(m)["bytes"]
    with tempfile.TemporaryDirectory() as tmp:
        st.save_packed(m, Path(tmp) / "m.slim")
        file = (Path(tmp) / "m.slim").stat().st_size
    return {"cost": cost, "file": file, "ratio": fp32 / cost, "file_ratio": fp32 / file}


def run_setup(key: str, seeds, quick: bool, log) -> dict:
    setup = dict(SETUPS[key])
    if quick:
        setup.update(steps=setup["steps"] // 10, ft_steps=setup["ft_steps"] // 10)
    x, y, xt, yt = load(setup, quick)
    res = {"float": {v: [] for v in VARIANTS}, "ipq": {}, "sizes": {}, "sec": {}}
    for v in VARIANTS:
        for s in seeds:
            t0 = time.perf_counter()
            torch.manual_seed(s)
            net = build_model(setup["model"], num_classes=10, **setup["kwargs"])
            fp32 = model_costs(net)["fp32_bytes"]
            attach_noise(net, setup, v)
            fit(net, (x, y), setup["steps"], setup["lr"], setup["bs"], s)
            st.remove_quant_noise_(net)
            res["float"][v].append(acc(net, xt, yt))
            t1 = time.perf_counter()
            for j, point in enumerate(setup["points"]):
                m = ipq(net, setup, point, (x, y), s, setup["ft_steps"])
                res["ipq"].setdefault(f"{v}|{j}", []).append(acc(m, xt, yt))
                if j not in res["sizes"]:
                    res["sizes"][j] = {**sizes(m, fp32), "fp32": fp32}
            res["sec"].setdefault(v, []).append((t1 - t0, time.perf_counter() - t1))
            log(f"{key} {v} seed {s}: float {res['float'][v][-1]:.2f}%, iPQ "
                + " / ".join(f"{res['ipq'][f'{v}|{j}'][-1]:.2f}%" for j in range(len(setup['points'])))
                + f" (train {t1 - t0:.0f} s, iPQ {time.perf_counter() - t1:.0f} s)")
    return res


def ms(v) -> str:
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def point_label(point: dict) -> str:
    return " / ".join(f"{k} {v}" for k, v in point.items())


def tables(key: str, res: dict) -> tuple[list, dict]:
    setup = SETUPS[key]
    base = statistics.mean(res["float"]["none"])
    sz = res["sizes"]
    lines = [f"**{setup['label']}** (FP32 {sz[0]['fp32']:,} B). Operating points (centroids per layer, int8 "
             "centroids; the sizes are the same for every variant):", "",
             "| point | centroids | cost bytes | file bytes | ratio (cost) | ratio (file) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for j, point in enumerate(setup["points"]):
        s = sz[j]
        lines.append(f"| {j + 1} | {point_label(point)} | {s['cost']:,} | {s['file']:,} | x{s['ratio']:.1f} | "
                     f"x{s['file_ratio']:.1f} |")
    head = " | ".join(f"iPQ x{sz[j]['ratio']:.1f} (drop)" for j in range(len(setup["points"])))
    lines += ["", f"| noise during training | FP32 accuracy (%) | {head} |",
              "| --- | --- | " + " | ".join("---" for _ in setup["points"]) + " |"]
    drops = {}
    for v in VARIANTS:
        cells = []
        for j in range(len(setup["points"])):
            a = res["ipq"][f"{v}|{j}"]
            drops[(v, j)] = base - statistics.mean(a)
            cells.append(f"{ms(a)} ({drops[(v, j)]:+.2f})")
        lines.append(f"| {v} | {ms(res['float'][v])} | " + " | ".join(cells) + " |")
    return lines, drops


def verdicts(key: str, res: dict, drops: dict) -> list:
    out, sz = [], res["sizes"]
    for j in range(len(SETUPS[key]["points"])):
        best = min(VARIANTS, key=lambda v: drops[(v, j)])
        qn = min((v for v in VARIANTS if v.startswith("QN")), key=lambda v: drops[(v, j)])
        out.append(f"at x{sz[j]['ratio']:.1f} the smallest drop is {best} ({drops[(best, j)]:+.2f} pt); best "
                   f"Quant-Noise {qn} {drops[(qn, j)]:+.2f} vs none {drops[('none', j)]:+.2f} and QAT "
                   f"{drops[('QAT p=1', j)]:+.2f} pt: Quant-Noise "
                   + ("smallest" if drops[(qn, j)] <= min(drops[("none", j)], drops[("QAT p=1", j)]) else "not smallest"))
    return out


def goal(res: dict, drops: dict) -> str:
    """The best (highest ratio, then smallest drop) cell meeting the goal, or the closest miss."""
    sz = res["sizes"]
    cells = [(sz[j]["ratio"], -d, v, j) for (v, j), d in drops.items() if sz[j]["ratio"] >= GOAL_RATIO]
    if not cells:
        return "**NOT met**: no operating point reaches x20"
    ok = [c for c in cells if -c[1] <= GOAL_DROP]
    r, d, v, j = max(ok) if ok else max(cells, key=lambda c: c[1])
    return (f"**{'met' if ok else 'NOT met'}**: {'' if ok else 'the best at >= x20 is '}{v} at x{r:.1f} "
            f"(file x{sz[j]['file_ratio']:.1f}), drop {-d:+.2f} pt")


def figure(all_res: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(all_res), figsize=(5.5 * len(all_res), 4))
    axes = axes if len(all_res) > 1 else [axes]
    for ax, (key, res) in zip(axes, all_res.items()):
        npts = len(SETUPS[key]["points"])
        xs = [res["sizes"][j]["ratio"] for j in range(npts)]
        for v, mk in zip(VARIANTS, "osv^D"):
            ys = [statistics.mean(res["ipq"][f"{v}|{j}"]) for j in range(npts)]
            es = [statistics.stdev(res["ipq"][f"{v}|{j}"]) if len(res["ipq"][f"{v}|{j}"]) > 1 else 0
                  for j in range(npts)]
            ax.errorbar(xs, ys, yerr=es, marker=mk, capsize=3, label=v)
        ax.axhline(statistics.mean(res["float"]["none"]), color="k", lw=0.8, label="FP32, no noise")
        ax.set_xscale("log")
        ax.set_xlabel("compression ratio (FP32 bytes / packed bytes)")
        ax.set_ylabel("held-out accuracy after iPQ (%)")
        ax.set_title(SETUPS[key]["label"])
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="subsets, 1/10 of the steps, 1 seed; RESULTS.md untouched")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", choices=sorted(SETUPS), default=None, help="one network (RESULTS.md untouched)")
    ap.add_argument("--variants", nargs="*", default=None, help="a subset of the variants (RESULTS.md untouched)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [0] if args.quick else list(range(args.seeds))
    partial = args.quick or args.only is not None or args.variants is not None
    if args.variants:
        bad = sorted(set(args.variants) - set(VARIANTS))
        if bad:
            raise SystemExit(f"unknown variant(s) {bad}; known: {list(VARIANTS)}")
        VARIANTS[:] = [v for v in VARIANTS if v in args.variants]
    la0, t0 = os.getloadavg()[0], time.perf_counter()
    all_res = {k: run_setup(k, seeds, args.quick, lambda s: print(s, flush=True))
               for k in SETUPS if args.only in (None, k)}
    CACHE.mkdir(parents=True, exist_ok=True)
    json.dump(all_res, open(CACHE / f"pq-ipq{'-quick' if args.quick else ''}.json", "w"), default=str)
    if args.variants:                   # a subset: the per-run lines above are the output
        return
    body = []
    for key, res in all_res.items():
        lines, drops = tables(key, res)
        body += lines + [""] + [f"- {v}" for v in verdicts(key, res, drops)] + [""]
        if key == "mnist":
            body += [f"Goal (>= x{GOAL_RATIO:.0f} at <= {GOAL_DROP:g} pt drop, MNIST CNN): {goal(res, drops)}.", ""]
    minutes = (time.perf_counter() - t0) / 60
    head = ["Training from scratch, Adam with linear decay: MNIST CNN on 14 x 14 average-pooled MNIST "
            f"(60,000 / 10,000), {SETUPS['mnist']['steps']} steps of 64, lr 1e-3; mnist1d CNN (4,000 / 1,000), "
            f"{SETUPS['mnist1d']['steps']} steps of 100, lr 1e-2 (both short of convergence: the 2-core budget). "
            "Noise on the layers iPQ quantizes, on the same blocks (MNIST: 3x3 kernels, 8 input features; mnist1d: 5 elements). QAT p=1 = exact PQ noise "
            f"(pq_exact), k-means refit every 100 steps, at the K of point {SETUPS['mnist']['qat_k'] + 1} (MNIST) / "
            f"{SETUPS['mnist1d']['qat_k'] + 1} (mnist1d); its FP32 column is the float weights with the noise "
            "removed (not what it trained to compute). iPQ: stage 1 convolutions, stage 2 linear layers, k-means "
            f"20 iterations, int8 centroids, {SETUPS['mnist']['ft_steps']} (MNIST, Adam 2e-3) / "
            f"{SETUPS['mnist1d']['ft_steps']} (mnist1d, Adam 2e-3) fine-tuning steps per stage (centroids + weights "
            "not yet quantized, `st.pq_param_groups`). Held-out accuracy, mean ± std over "
            f"{len(seeds)} seeds; drop = FP32 accuracy without noise (mean) - iPQ accuracy, in points."
            + (" **Quick run on subsets.**" if args.quick else ""), ""]
    tail = [f"Whole benchmark {minutes:.1f} min on 1 thread, load average {la0:.2f} at the start."]
    if not partial:
        try:
            body += ["", f"![accuracy vs compression](figures/{figure(all_res, FIG).name})"]
        except Exception as e:          # the table matters more than the plot
            print(f"figure failed: {e}")
    text = "\n".join(head + body + tail)
    print(text)
    if not partial:
        write_section(NAME, text)


if __name__ == "__main__":
    main()
