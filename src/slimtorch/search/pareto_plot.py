"""Draw a HAWQ-V2 Pareto frontier (Dong et al. 2020, Fig. 4): budget vs sum Omega, with the chosen
plan, the uniform plans, NNCF's monotone plan and the budget line. Matplotlib with the Agg backend."""
from __future__ import annotations

from pathlib import Path

UNITS = {"avg_bits": "average weight bits", "bytes": "model bytes", "bitops": "BitOps per sample"}


def plot_frontier(result, path, title: str | None = None) -> Path:
    """Write ``result`` (a :class:`slimtorch.search.hawq.HAWQResult`) as a PNG at ``path``."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    xs = [x for x, _ in result.frontier]
    ys = [y for _, y in result.frontier]
    positive = all(y > 0 for y in ys) and all(u["omega"] > 0 for u in result.uniform.values())
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.step(xs, ys, where="post", color="0.6", lw=1, zorder=1)
    ax.scatter(xs, ys, s=10, color="tab:blue", label=f"Pareto frontier ({len(xs)} plans)", zorder=2)
    for b, u in sorted(result.uniform.items()):
        ax.scatter([u["value"]], [u["omega"]], marker="s", s=40, color="tab:orange", zorder=3,
                   label="uniform" if b == min(result.uniform) else None)
        ax.annotate(f"{b}-bit", (u["value"], u["omega"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    if result.monotone is not None:
        ax.scatter([result.monotone["value"]], [result.monotone["omega"]], marker="^", s=50,
                   color="tab:green", zorder=4, label="monotone heuristic (NNCF)")
    ax.scatter([result.value], [result.omega_total], marker="*", s=160, color="tab:red", zorder=5,
               label="chosen (HAWQ-V2)")
    limit = result.target
    ax.axvline(limit, color="tab:red", ls="--", lw=0.8, label=f"budget {limit:g}")
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel(UNITS.get(result.budget, result.budget))
    ax.set_ylabel("sum of Omega (avg trace x ||Q(W) - W||^2)")
    ax.set_title(title or "HAWQ-V2 Pareto frontier")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
