"""``slimtorch hawq``: Hessian traces, HAWQ-V2 plan and Pareto frontier for a zoo model.

    slimtorch hawq --model mnist1d_cnn --dataset mnist1d --checkpoint ck.slimckpt --target 3 --out hawq/

prints per-layer traces and the plan, writes ``plan.json`` (plan, frontier, Omega, traces; its
"plan" feeds ``quantize_(plan=...)``) and ``frontier.png``."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path


def register(subparsers):
    p = subparsers.add_parser("hawq", help="HAWQ-V2 mixed-precision plan from Hessian traces",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="zoo model name (slimtorch.models.list_models())")
    p.add_argument("--dataset", required=True, help="dataset name (slimtorch.data.list_datasets())")
    p.add_argument("--checkpoint", help="trained weights (slimtorch checkpoint)")
    p.add_argument("--config", help="YAML/JSON with method: hawq (flags below override it)")
    p.add_argument("--bits", help="candidate bits, e.g. 2,4,8")
    p.add_argument("--budget", choices=("avg_bits", "bytes", "bitops"))
    p.add_argument("--target", type=float, help="budget value (avg bits, bytes or BitOps)")
    p.add_argument("--quant", default="lsq+", help="quant method the plan is for (byte accounting)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, help="batches per Hutchinson iteration")
    p.add_argument("--max-iter", type=int)
    p.add_argument("--tol", type=float)
    p.add_argument("--patience", type=int, help="calm steps in a row for the tol rule (default 1, PyHessian's rule)")
    p.add_argument("--rel-stderr", type=float, help="stop at this relative standard error instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="hawq_out", help="folder for plan.json and frontier.png")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..checkpoint import load_checkpoint
    from ..config import config_from_dict, load_config
    from ..data import load_dataset, make_loader
    from ..models import build_model
    from ..search.hawq import HAWQConfig, hawq_search
    from ..search.pareto_plot import plot_frontier

    cfg = load_config(args.config) if args.config else HAWQConfig()
    if not isinstance(cfg, HAWQConfig):
        from ..errors import ConfigError
        raise ConfigError(f"{args.config}: expected method: hawq, got {type(cfg).method}")
    over = {"budget": args.budget, "target": args.target, "max_iter": args.max_iter, "tol": args.tol,
            "patience": args.patience, "rel_stderr": args.rel_stderr,
            "num_batches": args.batches, "seed": args.seed,
            "bits": tuple(int(b) for b in args.bits.split(",")) if args.bits else None}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None})
    bundle = load_dataset(args.dataset)
    model = build_model(args.model, num_classes=bundle.num_classes)
    if args.checkpoint:
        load_checkpoint(args.checkpoint, model=model, restore_rng=False)
    torch.manual_seed(args.seed)
    loader = make_loader(bundle.train, args.batch_size, seed=args.seed)
    res = hawq_search(model, loader, cfg, quant=config_from_dict({"method": args.quant}),
                      progress=not args.no_progress)
    tr = res.traces
    print(f"Hutchinson: {tr.iterations} iterations, converged={tr.converged}, {tr.seconds:.1f} s")
    print(f"{'layer':<24}{'numel':>10}{'avg trace':>13}{'stderr':>11}  plan")
    for n in res.names:
        t = f"{tr.traces[n]:13.4e}{tr.stderr[n]:11.2e}" if n in tr.traces else f"{'frozen':>13}{'':>11}"
        print(f"{n:<24}{tr.numel.get(n, 0):>10}{t}  {res.plan[n]}")
    print(f"budget {res.budget} <= {res.target:g}: plan uses {res.value:.6g} (exact count {res.cost}), "
          f"sum Omega {res.omega_total:.4e}; feasible range {res.feasible_range[0]:.6g}..{res.feasible_range[1]:.6g}")
    if res.monotone is not None:
        print(f"monotone heuristic (NNCF): sum Omega {res.monotone['omega']:.4e} at {res.monotone['value']:.6g}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(res.as_dict(), indent=1))
    plot_frontier(res, out / "frontier.png", title=f"HAWQ-V2: {args.model} on {args.dataset}")
    print(f"wrote {out / 'plan.json'} and {out / 'frontier.png'}")
    return 0
