"""Issue 11 benchmark: BatchNorm folding and re-estimation on a depthwise-separable CNN trained
briefly on scikit-learn's digits. W4A4 / W2A2 LSQ (per-tensor and per-channel weight steps), every layer quantized; PTQ (calibration only)
and short QAT; BN kept / folded exactly before quantize_ / folded for QAT (batch statistics for the
first epoch, then ``freeze_bn_stats``); with and without ``reestimate_bn_``. Accuracy on the
held-out split (360 digits), mean over seeds. Prints only (it writes no RESULTS.md section).

    PYTHONPATH=src python -m benchmarks.bn_fold [--seeds 3] [--qat-epochs 2]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import slimtorch as st
from slimtorch.data import load_dataset, make_loaders
from slimtorch.train import TrainConfig, evaluate, train


def separable_cnn(num_classes: int = 10) -> nn.Module:
    """conv-BN-ReLU, two (depthwise 3x3-BN-ReLU, pointwise 1x1-BN-ReLU) blocks, pooling, Linear."""
    def block(cin, cout, stride=1):
        return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         *block(8, 16), *block(16, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, num_classes))


def acc(model, te) -> float:
    return 100.0 * evaluate(model, te.batches(0))["accuracy"]


def reestimated(model, tr, batches=16) -> nn.Module | None:
    """A copy with BN statistics re-estimated, or None when no BN is left to re-estimate."""
    m = copy.deepcopy(model)
    return m if st.reestimate_bn_(m, tr.batches(0), num_batches=batches) else None


def run_one(net, fold: str, bits: int, weights: str, tr, te, qat_epochs: int, lr: float) -> dict:
    m = copy.deepcopy(net)
    x = next(iter(tr.batches(0)))[0]
    if fold != "none":
        st.fold_batchnorm_(m, x, train=fold == "qat")
    st.quantize_(m, st.LSQ(w_bits=bits, a_bits=bits, weights=weights))
    st.calibrate(m, tr.batches(0), num_batches=4, rounding="nearest")
    out = {"ptq": acc(m, te)}
    r = reestimated(m, tr)
    out["ptq+re"] = acc(r, te) if r is not None else None
    steps = len(tr.batches(0))
    freeze = (lambda mod, s: st.freeze_bn_stats(mod) if s == steps else None) if fold == "qat" else None
    train(m, tr.batches, TrainConfig(epochs=qat_epochs, lr=lr, progress=False), on_step=freeze)
    out["qat"] = acc(m, te)
    r = reestimated(m, tr)
    out["qat+re"] = acc(r, te) if r is not None else None
    return out


def fmt(vals) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "n/a"
    mean = statistics.mean(vals)
    return f"{mean:.1f}" + (f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--float-epochs", type=int, default=6)
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)      # small convolutions: one thread is fastest here
    t0 = time.time()
    bundle = load_dataset("digits")
    rows: dict = {}
    fp32 = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        tr, te = make_loaders(bundle, batch_size=64, seed=seed, test_batch_size=512)
        net = separable_cnn(bundle.num_classes)
        train(net, tr.batches, TrainConfig(epochs=args.float_epochs, lr=1e-2, seed=seed, progress=False))
        fp32.append(acc(net, te))
        for weights in ("per_tensor", "per_channel"):
            for bits in (4, 2):
                for fold in ("none", "exact", "qat"):
                    torch.manual_seed(seed)
                    res = run_one(net, fold, bits, weights, tr, te, args.qat_epochs, args.lr)
                    for k, v in res.items():
                        rows.setdefault((bits, weights, fold), {}).setdefault(k, []).append(v)
    print(f"digits, depthwise-separable CNN ({sum(p.numel() for p in separable_cnn().parameters())} params), "
          f"{args.seeds} seed(s), FP32 {fmt(fp32)}%, QAT {args.qat_epochs} epochs lr {args.lr}, "
          f"BN re-estimation on 16 batches of 64; {time.time() - t0:.0f} s")
    print("fold: none = BN kept; exact = fold_batchnorm_ before quantize_; qat = fold_batchnorm_(train=True),"
          " batch stats for epoch 1 then freeze_bn_stats. n/a: no BatchNorm left to re-estimate.")
    print("| W/A | weights | fold | PTQ | PTQ + BN re-est. | QAT | QAT + BN re-est. |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (bits, weights, fold), r in rows.items():
        print(f"| {bits}/{bits} | {weights} | {fold} | {fmt(r['ptq'])} | {fmt(r['ptq+re'])} | {fmt(r['qat'])} | {fmt(r['qat+re'])} |")


if __name__ == "__main__":
    main()
