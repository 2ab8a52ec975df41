"""Issue 2 benchmark: LSQ / LSQ+ QAT on MNIST (small CNN) and mnist1d (1-D CNN), all layers
quantized (first and last included), plus QAT step time / FP32 step time in the same process.

    PYTHONPATH=src python -m benchmarks.lsq_qat [--quick]
"""
from __future__ import annotations

import argparse
import os

import torch

import slimtorch as st
from slimtorch.train import TrainConfig

from .common import accuracy, float_model, qat, step_times
from .results import write_section


def rows_for(name, net, tr, te, methods, ft: TrainConfig):
    fp32 = accuracy(net, te)
    out = [(name, "FP32 (trained)", "32/32", "-", f"{fp32:.2f}")]
    _, _, ctrl = qat(net, None, tr, te, ft)
    out.append((name, "FP32 + same extra epoch(s) (control)", "32/32", "-", f"{ctrl:.2f}"))
    for label, cfg in methods:
        m, before, after = qat(net, cfg, tr, te, ft)
        out.append((name, label, f"{cfg.w_bits}/{cfg.a_bits}", f"{before:.2f}", f"{after:.2f}"))
    return out, fp32, ctrl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="subsets, for a smoke run")
    args = ap.parse_args()
    torch.set_num_threads(2)
    q = args.quick
    methods = [("LSQ+ W4A4", st.LSQPlus(w_bits=4, a_bits=4)),
               ("LSQ W4A4", st.LSQ(w_bits=4, a_bits=4)),
               ("LSQ+ W2A2", st.LSQPlus(w_bits=2, a_bits=2)),
               ("LSQ W2A2", st.LSQ(w_bits=2, a_bits=2))]
    opts = {"limit_train": 6000, "limit_test": 2000} if q else {}
    fcfg = TrainConfig(epochs=2, lr=1e-3, batch_size=64, progress=False)
    ft = TrainConfig(epochs=1, lr=5e-4, batch_size=64, progress=False)
    net, _, tr, te = float_model("mnist_cnn", "mnist", fcfg, opts, tag="-quick" if q else "")
    rows, fp32, ctrl = rows_for("MNIST CNN", net, tr, te, methods, ft)

    f1 = TrainConfig(epochs=20 if q else 150, lr=1e-2, batch_size=100, progress=False)
    ft1 = TrainConfig(epochs=3 if q else 20, lr=2e-3, batch_size=100, progress=False)
    net1, _, tr1, te1 = float_model("mnist1d_cnn", "mnist1d", f1, tag="-quick" if q else "")
    rows1, _, _ = rows_for("mnist1d CNN", net1, tr1, te1, methods, ft1)

    # step time, same process, same batch, interleaved
    x, y = next(iter(tr.batches(0)))
    qnet = st.quantize_(float_model("mnist_cnn", "mnist", fcfg, opts, tag="-quick" if q else "")[0],
                        st.LSQPlus(w_bits=4, a_bits=4))
    st.calibrate(qnet, [(x,)])
    times = step_times({"fp32": net, "lsq+": qnet}, x, y)
    ratio = times["lsq+"] / times["fp32"]
    w4 = next(r for r in rows if r[1] == "LSQ+ W4A4")
    body = [
        f"MNIST: FP32 {fcfg.epochs} epochs (Adam {fcfg.lr}, batch {fcfg.batch_size}); then {ft.epochs} epoch "
        f"of QAT (Adam {ft.lr}, cosine) from it. mnist1d: FP32 {f1.epochs} epochs, QAT {ft1.epochs} epochs. "
        "Every layer quantized, first and last included; LSQ+ = learned offset activations, 3-sigma weight "
        "init, MSE activation init; LSQ = 2<|v|>/sqrt(Q_P) init, signed/unsigned activations decided from data."
        + (" **Quick run on subsets.**" if q else ""), "",
        "| model | method | W/A bits | acc. after calibration (%) | held-out acc. (%) |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {' | '.join(r)} |" for r in rows + rows1], "",
        f"Headline: MNIST W4A4 LSQ+ {w4[4]}% vs FP32 control {ctrl:.2f}% "
        f"(goal: >= control - 0.1 pt: {'met' if float(w4[4]) >= ctrl - 0.1 else 'NOT met'}).", "",
        f"QAT step time (MNIST CNN, batch {x.shape[0]}, forward+backward+Adam, median of 3x30 steps after "
        f"warm-up, {torch.get_num_threads()} threads): FP32 {1e3 * times['fp32']:.2f} ms, "
        f"LSQ+ W4A4 {1e3 * times['lsq+']:.2f} ms, **ratio {ratio:.2f}x** (goal <= 1.3x). "
        f"Load average during the run: {os.getloadavg()[0]:.2f}.",
    ]
    write_section("LSQ / LSQ+ QAT (issue 2)", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
