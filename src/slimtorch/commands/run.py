"""``slimtorch run RECIPE.yaml --out DIR [--resume]``: train, compress, evaluate, report, export."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("run", help="run a recipe: train/compress/evaluate/export",
                       description="Run a recipe (YAML/JSON): float model -> compress -> fine-tune -> "
                                   "evaluate -> report -> packed export. Writes DIR/metrics.json and DIR/report.md.")
    p.add_argument("recipe", help="recipe file (see recipes/)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel worker processes (torch.distributed, started by torch's own launcher; "
                        "each global batch is split over them)")
    p.add_argument("--backend", default=None, help="gloo (CPU, default) or nccl (one GPU per process)")
    p.add_argument("--nnodes", type=int, default=1, help="machines (torchrun's --nnodes; with --rdzv-endpoint)")
    p.add_argument("--rdzv-endpoint", default=None, help="host:port of the rendezvous for --nnodes > 1")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import os
    from pathlib import Path

    from ..pipeline import run_recipe
    from ..recipe import load_recipe

    recipe = load_recipe(args.recipe)
    out = Path(args.out or Path("runs") / Path(args.recipe).stem)
    if args.nproc > 1 or args.nnodes > 1 or args.backend is not None:
        if "LOCAL_RANK" not in os.environ:
            from .launch import launch
            return launch(args, recipe, out)
    from .launch import worker
    with worker(args.backend):
        from .. import distributed as D
        m = run_recipe(recipe, out, resume=args.resume, progress=not args.no_progress and D.is_main())
        if not D.is_main():
            return 0
    print((out / "report.md").read_text())
    print(json.dumps({**{k: m[k] for k in ("fp32_accuracy", "accuracy", "fp32_size_bytes", "size_bytes",
                                           "compression")}, "seconds": m["timing"]["seconds"]}))
    print(f"wrote {out / 'metrics.json'}, {out / 'report.md'}, {out / m['export']['path']}")
    return 0
