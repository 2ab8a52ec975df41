"""EBS Fig. 1 analogue (issue 14): the strength of each candidate bitwidth over the search, per layer.

    PYTHONPATH=src python -m benchmarks.ebs_figure

The paper's figure searches 1..4 bits for weights and activations; slimtorch's quantizers start at 2
bits, so the candidates here are {2, 3, 4}. mnist1d CNN (the float model of benchmarks/ebs_mixed.py),
BitOps target of uniform W3A3, every layer searched. Writes benchmarks/figures/ebs_strengths.png.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import slimtorch as st
from slimtorch.data import make_loader
from slimtorch.search.ebs import EBSConfig

from .ebs_mixed import SETUPS, float_net
from .results import write_section

FIG = Path(__file__).parent / "figures" / "ebs_strengths.png"


def plot(history, path: Path, bits) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(history[0]["probs"])
    fig, axes = plt.subplots(2, len(layers), figsize=(3 * len(layers), 5), sharex=True, sharey=True)
    steps = [h["step"] for h in history]
    for j, n in enumerate(layers):
        for i, side in enumerate(("w", "a")):
            ax = axes[i][j]
            for k, b in enumerate(bits):
                ax.plot(steps, [h["probs"][n][side][k] for h in history], label=f"{b} bit")
            ax.set_title(f"layer {n} {'weights' if side == 'w' else 'inputs'}", fontsize=9)
            ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("search step")
    axes[0][0].set_ylabel("p = softmax(alpha / T)")
    axes[1][0].set_ylabel("p = softmax(alpha / T)")
    fig.suptitle("EBS: strength of each candidate bitwidth during the search (mnist1d CNN; T annealed 1 -> 0.1 after step 150)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = SETUPS["mnist1d"]
    net, bundle, tr, te = float_net(s)
    bits = (2, 3, 4)
    cfg = EBSConfig(bits=bits, a_bits=bits, budget="bitops", target_uniform=3, steps=args.steps,
                    warmup=args.steps // 6, lr=s["lr"])
    load0 = os.getloadavg()[0]
    r = st.ebs_search(net, make_loader(bundle.train, 100, seed=0).batches, cfg, example_input=next(iter(tr.batches(0)))[0][:2],
                      progress=False)
    plot(r.history, FIG, bits)
    first, last = r.history[0]["probs"], r.history[-1]["probs"]
    lines = [f"Candidates {{2, 3, 4}} bits for W and A, BitOps target of uniform W3A3, {args.steps} steps "
             f"({args.steps // 6} warm-up with the strengths frozen), {r.seconds:.0f} s. "
             f"Plot: `benchmarks/figures/ebs_strengths.png`.", "",
             "| layer | side | p at step 0 | p at the end | argmax | chosen (after fit) |", "|---|---|---|---|---|---|"]
    dominant = 0
    for n in last:
        for side in ("w", "a"):
            p0, p1 = first[n][side], last[n][side]
            arg = bits[max(range(len(bits)), key=lambda k: p1[k])]
            dominant += max(p1) > 0.5
            chosen = r.plan[n]["w_bits" if side == "w" else "a_bits"]
            lines.append(f"| {n} | {side.upper()} | {' / '.join(f'{v:.2f}' for v in p0)} | "
                         f"{' / '.join(f'{v:.2f}' for v in p1)} | {arg} | {chosen} |")
    total = 2 * len(last)
    lines += ["", f"Headline: after the search one candidate holds p > 0.5 in {dominant} of {total} "
              f"strength vectors (the paper's figure: one candidate dominates by epoch 100); plan BitOps "
              f"{r.value / r.target:.3f} x the target, bare argmax {r.argmax_value / r.target:.3f} x.",
              "", f"Load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end."]
    write_section("EBS strengths during the search, Fig. 1 analogue (issue 14)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
