"""Table 1 and Table 3 analogues of Uhlich et al. (ICLR 2020) on the mnist1d CNN and the MNIST CNN.

    PYTHONPATH=src python -m benchmarks.uhlich_mixed --dataset mnist1d --part table1   (and --part table3)
    PYTHONPATH=src python -m benchmarks.uhlich_mixed --dataset mnist --part table1     (and --part table3)

1. Table 1: from a float checkpoint, quantize weights only / weights and activations with each of
   U1, U2, U3, P1, P2, P3 (initial b = 4, no size constraint) and fine-tune; test error.
2. Table 3: weight budget = size at uniform 2 bits + 7% (the paper's 70 KB vs 65.5 KB), budget on the
   largest activation = 4 bits; learned mixed precision (U3, penalty Eq. 10) vs fixed 2/4-bit and
   LSQ 2/4-bit. Sizes as the paper's Table 2: (weights + bias) x b_w / 8 and input elements per sample x
   b_a / 8. As the official code, the reported checkpoint is the best (validation accuracy) epoch
   end that meets the budgets.
3. The same with bits restricted to {2, 4, 8} and with tied W/A bits (b = max), at the same budgets.
Each (dataset, part) writes its own section of benchmarks/RESULTS.md."""
from __future__ import annotations

import argparse
import copy
import math
import os
import time

import torch

import slimtorch as st
from slimtorch.data import load_dataset, make_loaders
from slimtorch.models.zoo import build_model
from slimtorch.quant.uhlich import Uhlich
from slimtorch import cost as B
from slimtorch.search.penalty import MemoryBudget, attach_budget, freeze_bits_, penalty, read_plan, step
from slimtorch.train import TrainConfig, evaluate, train

SETTINGS = {
    # dataset: model, data options, batch, float epochs, Table-1 epochs, Table-3 epochs
    "mnist1d": dict(model="mnist1d_cnn", data=dict(val_fraction=0.1), batch=100, float_epochs=30,
                    float_lr=1e-2, t1_epochs=4, t3_epochs=10, eval_every=6),
    "mnist": dict(model="mnist_cnn", data=dict(val_fraction=0.05, limit_train=12000), batch=128,
                  float_epochs=2, float_lr=1e-3, t1_epochs=1, t3_epochs=3, eval_every=10),
}
PARAMS = ("U1", "U2", "U3", "P1", "P2", "P3")
QLR = 0.01


def _cfg(epochs, lr, opt="sgd"):
    return TrainConfig(epochs=epochs, lr=lr, optimizer=opt, momentum=0.9, progress=False, checkpoint_every=0,
                       log_every=1000)


class Run:
    def __init__(self, name, data):
        self.name, self.data = name, data
        bundle = load_dataset(name, **data["data"])
        self.train, self.test = make_loaders(bundle, batch_size=data["batch"], seed=0)
        from slimtorch.data import make_loader
        self.val = make_loader(bundle.val, 500, 0, shuffle=False)
        self.example = next(iter(self.train.batches(0)))[0][:2]

    def float_model(self, epochs):
        torch.manual_seed(0)
        m = build_model(self.data["model"])
        train(m, self.train.batches, _cfg(epochs, self.data["float_lr"], "adam"))
        return m

    def finetune(self, model, epochs, budget=None, shapes=None, freeze_after=None):
        """SGD (momentum 0.9, cosine) on CE (+ penalty), st.step after each step. Every
        ``eval_every`` steps at which ``budget`` is met the validation accuracy is measured and the
        best model kept (the official code validates whenever the constraints hold). With
        ``freeze_after`` (fraction of the steps) the bits are frozen (``freeze_bits_``) at the first
        step after it where the budget is met; the step sizes keep learning."""
        total = epochs * len(self.train.batches(0))
        best = {"val": -1.0, "model": None, "frozen_at": None}

        def on_step(m, s):
            step(m)
            ok = budget is None or budget.met(m, shapes)
            if ok and freeze_after is not None and best["frozen_at"] is None and s >= freeze_after * total:
                freeze_bits_(m)
                best["frozen_at"] = s
            if ok and (s % self.data["eval_every"] == 0 or s == total):
                v = evaluate(m, self.val)["accuracy"]
                if v > best["val"]:
                    best.update(val=v, model=copy.deepcopy(m))

        train(model, self.train.batches, _cfg(epochs, QLR), extra_loss=penalty if budget else None,
              on_step=on_step)
        final = model
        if best["model"] is not None:
            final = best["model"]
        return {"test": evaluate(final, self.test)["accuracy"], "met": best["model"] is not None,
                "val": best["val"], "model": final, "frozen_at": best["frozen_at"], "steps": total}


def table2_sizes(model, shapes):
    w = B.weight_bytes(model, bias_bits=True)
    acts = B.activation_costs(model, shapes=shapes)
    return w, acts["max"], acts["sum"]


def avg_bits(model):
    plan = read_plan(model)
    num = {n: B.raw_weight(model.get_submodule(n)).numel() for n in plan}
    w = sum(plan[n]["w_bits"] * num[n] for n in plan) / sum(num.values())
    a = [plan[n]["a_bits"] for n in plan if plan[n]["a_bits"] is not None]
    return w, (sum(a) / len(a) if a else None)


def quantized(base, cfg, run, calib=True):
    m = copy.deepcopy(base)
    st.quantize_(m, cfg)
    if calib and (getattr(cfg, "a_bits", None) is not None):
        st.calibrate(m, run.train.batches(0), num_batches=5, rounding="nearest")
    m(run.example)
    return m


def table1(run, base, data, t0):
    lines = [f"### Table 1 analogue: test error (%) after {data['t1_epochs']} epochs, initial b = 4, "
             "no size constraint (learned mean W / A bits in brackets; float: "
             f"{100 * (1 - evaluate(base, run.test)['accuracy']):.2f}%)", "",
             "| quantized | " + " | ".join(PARAMS) + " |", "|---|" + "---|" * len(PARAMS)]
    for mode in ("W", "W+A"):
        cells = []
        for p in PARAMS:
            cfg = Uhlich(kind="uniform" if p[0] == "U" else "pow2", parametrization=p,
                         a_bits=4 if mode == "W+A" else None, a_init="float")
            r = run.finetune(quantized(base, cfg, run), data["t1_epochs"])
            wb, ab = avg_bits(r["model"])
            bits = f"{wb:.1f}" + (f"/{ab:.1f}" if ab is not None else "")
            cells.append(f"{100 * (1 - r['test']):.2f} ({bits})")
            print(mode, p, cells[-1], f"{time.time() - t0:.0f}s", flush=True)
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return lines


def table3(run, base, data, shapes, t0):
    w2 = sum(math.ceil((B.raw_weight(m).numel() + (m.bias.numel() if m.bias is not None else 0)) * 2 / 8)
             for m in base.modules() if isinstance(m, B.QUANTIZABLE))
    amax4 = max(math.ceil(s.in_numel * 4 / 8) for s in shapes.values())
    tgt_w, tgt_a = math.floor(1.07 * w2), amax4
    lines = [f"### Table 3 analogue: weight <= {tgt_w} B (uniform 2-bit = {w2} B, + 7%), largest "
             f"activation <= {tgt_a} B (4 bits); {data['t3_epochs']} epochs", "",
             "Sizes as the paper's Table 2 (bias at the weight bits; activations = input elements per sample "
             "x bits / 8). Every run is selected the same way: validation accuracy every "
             f"{data['eval_every']} steps at which the budgets hold, best kept (official code). "
             "'freeze' = penalty training until 40% of the steps, then the bits are frozen "
             "(`freeze_bits_`) at the first step where the budgets hold and only the step sizes and "
             "weights keep training.", "",
             "| setting | W size (B) | A max (B) | A sum (B) | meets budget | test acc (%) | W bits per layer | "
             "A bits per layer |", "|---|---|---|---|---|---|---|---|"]
    kw = dict(target_weight=float(tgt_w), target_act_max=float(tgt_a), target_unit="B",
              lambdas=(0.1, 0.1, 0.1), bias_bits=True, a_init="float")
    settings = [
        ("fixed 2/4 (pow2 grid from max, d/qmax frozen)", Uhlich(w_bits=2, a_bits=4, a_init="float"), "fixed", None),
        ("LSQ 2/4 (learned step)", st.LSQ(w_bits=2, a_bits=4, weights="per_tensor", w_init="lsq", a_init="lsq"), None, None),
        ("learned U3 (8a)+(8c), penalty throughout", Uhlich(**kw), "budget", None),
        ("learned U3 (8a)+(8c), freeze", Uhlich(**kw), "budget", 0.4),
        ("learned U3, bits in {2,4,8}, freeze", Uhlich(bit_set=(2, 4, 8), **kw), "budget", 0.4),
        ("learned U3, tied W/A bits, freeze", Uhlich(tie_bits=True, **kw), "budget", 0.4),
        ("learned U3, tied + {2,4,8}, freeze", Uhlich(tie_bits=True, bit_set=(2, 4, 8), **kw), "budget", 0.4),
    ]
    rows, reports = {}, {}
    for name, cfg, kind, freeze in settings:
        m = quantized(base, cfg, run)
        if kind == "fixed":
            for mod in m.modules():
                if hasattr(mod, "clip_values_"):
                    for p in mod.parameters(recurse=False):
                        p.requires_grad_(False)
        bud = MemoryBudget(weight=float(tgt_w), act_max=float(tgt_a), unit="B", bias_bits=True)
        if kind == "budget":
            attach_budget(m, bud)
        r = run.finetune(m, data["t3_epochs"], budget=bud if kind == "budget" else None, shapes=shapes,
                         freeze_after=freeze)
        m = r["model"]
        w, amax, asum = table2_sizes(m, shapes)
        plan = read_plan(m)
        met = w <= tgt_w and amax <= tgt_a
        rows[name] = (r["test"], met)
        lines.append(f"| {name} | {w} | {amax} | {asum} | {'yes' if met else 'NO'} | {100 * r['test']:.2f} | "
                     f"{'/'.join(str(v['w_bits']) for v in plan.values())} | "
                     f"{'/'.join(str(v['a_bits']) for v in plan.values())} |")
        if kind == "budget" and not reports:
            reports[name] = st.report(m).to_markdown()
        print(lines[-1], "frozen at", r["frozen_at"], "of", r["steps"], f"{time.time() - t0:.0f}s", flush=True)
    fixed = rows[settings[0][0]][0]
    lines += [""] + [f"{name} vs fixed 2/4: {100 * (acc - fixed):+.2f} pt "
                     f"({'meets' if met else 'MISSES'} the budgets)."
                     for name, (acc, met) in rows.items() if name.startswith("learned")]
    lines += ["", f"Layers in order: {', '.join(read_plan(m))}. `st.report()` of the "
              f"'{next(iter(reports))}' model (packed-file bytes, bias float32):", "", next(iter(reports.values()))]
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", choices=sorted(SETTINGS), default="mnist1d")
    ap.add_argument("--part", choices=("table1", "table3"), required=True)
    ap.add_argument("--float-epochs", type=int)
    ap.add_argument("--t1-epochs", type=int)
    ap.add_argument("--t3-epochs", type=int)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    data = dict(SETTINGS[args.dataset])
    for k in ("float_epochs", "t1_epochs", "t3_epochs"):
        if getattr(args, k) is not None:
            data[k] = getattr(args, k)
    torch.manual_seed(0)
    t0 = time.time()
    run = Run(args.dataset, data)
    base = run.float_model(data["float_epochs"])
    float_acc = evaluate(base, run.test)["accuracy"]
    shapes = B.trace_layers(base, run.example)
    lines = [f"Model `{data['model']}` on `{args.dataset}` ({data['data']}), float checkpoint: "
             f"Adam {data['float_lr']:g}, {data['float_epochs']} epochs, test accuracy {100 * float_acc:.2f}%. Quantized fine-tuning: "
             f"SGD momentum 0.9, lr {QLR} cosine, batch {data['batch']}, same for every row; st.step (value "
             "clipping) after each step; activation quantizers initialised from calibration data "
             "(a_init='float', 5 batches); every layer quantized (first and last included, the input of "
             "the first layer too). Short schedules to fit ~8 minutes on 2 shared cores.", ""]
    if args.part == "table1":
        lines += table1(run, base, data, t0)
    else:
        lines += table3(run, base, data, shapes, t0)
    secs = time.time() - t0
    la = os.getloadavg()
    lines += ["", f"Runtime {secs:.0f} s; load average at the end {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}."]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        from benchmarks.results import write_section
        write_section(f"uhlich_{args.part}_{args.dataset}", body,
                      command=f"PYTHONPATH=src python -m benchmarks.uhlich_mixed --dataset {args.dataset} "
                              f"--part {args.part}")


if __name__ == "__main__":
    main()
