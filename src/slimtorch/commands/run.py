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
    p.set_defaults(func=_run)


def _run(args) -> int:
    from pathlib import Path

    from ..pipeline import run_recipe
    from ..recipe import load_recipe

    recipe = load_recipe(args.recipe)
    out = Path(args.out or Path("runs") / Path(args.recipe).stem)
    m = run_recipe(recipe, out, resume=args.resume, progress=not args.no_progress)
    print((out / "report.md").read_text())
    print(json.dumps({**{k: m[k] for k in ("fp32_accuracy", "accuracy", "fp32_size_bytes", "size_bytes",
                                           "compression")}, "seconds": m["timing"]["seconds"]}))
    print(f"wrote {out / 'metrics.json'}, {out / 'report.md'}, {out / m['export']['path']}")
    return 0
