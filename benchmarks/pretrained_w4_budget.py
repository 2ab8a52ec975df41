"""Issue 11: where 4-bit weights lose fidelity on a real pretrained network. EfficientNet-Lite1 (the
model, crops and metrics of benchmarks/pretrained_ptq.py), one layer group at a time at W4 with every
other layer float and activations float, rounded to nearest and with the defaults (GPTQ in
``calibrate``); then every layer at W4 (weights only, and W4A8), with more calibration crops, and with
GPTQ's asymmetric target (the float model's output, AdaRound Eq. 25).

    PYTHONPATH=src python -m benchmarks.pretrained_w4_budget [--only group,asym] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import torch

import slimtorch as st

from . import pretrained_ptq as P
from .results import write_section

SECTION = "Where W4 loses: EfficientNet-Lite1 by layer group (issue 11)"
GROUPS = {"stem conv (3x3, 3 inputs)": "_conv_stem", "depthwise convs": "*_depthwise_conv",
          "expand 1x1 convs": "*_expand_conv", "project 1x1 convs": "*_project_conv",
          "head 1x1 conv": "_conv_head", "classifier (Linear)": "_fc"}


def run_group(pattern: str, rounding: str):
    def run(m, data):
        st.quantize_(m, st.LSQPlus(w_bits=4, a_bits=None), include=[pattern])
        st.calibrate(m, data, rounding=rounding)
    return run


def run_all(a_bits, asymmetric: bool = False):
    def run(m, data):
        st.quantize_(m, st.LSQPlus(w_bits=4, a_bits=a_bits))
        if not asymmetric:
            st.calibrate(m, data)
            return
        st.calibrate(m, data, rounding="nearest")
        st.gptq_(m, data, asymmetric=True)
    return run


def entries(n_calib: int, n_more: int) -> list:
    """(kind, row name, quantize function, calibration crops)."""
    out = [("group", f"{g}: W4, rest float", (run_group(p, "nearest"), run_group(p, "auto")), n_calib)
           for g, p in GROUPS.items()]
    out += [("all", "every layer W4, activations float (defaults)", run_all(None), n_calib),
            ("all", "every layer W4A8 (defaults)", run_all(8), n_calib),
            ("more", f"every layer W4, activations float (defaults), {n_more} calibration crops", run_all(None), n_more),
            ("asym", "every layer W4A8, gptq_(asymmetric=True) after rounding='nearest'", run_all(8, True), n_calib)]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-test", type=int, default=256)
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--n-more", type=int, default=128, help="calibration crops of the 'more' row")
    ap.add_argument("--only", default=None, help="comma-separated kinds: group, all, more, asym")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = P.load_model()
    _, test = P.make_data(args.n_calib, args.n_test)
    ref = P.logits(model, test)
    calib = {n: P.make_data(n, 1)[0] for n in {args.n_calib, args.n_more}}   # the first n_calib crops are shared
    start = time.perf_counter()
    lines = []
    for kind, name, fn, n in entries(args.n_calib, args.n_more):
        if args.only and kind not in args.only.split(","):
            continue
        if kind == "group":
            near, dflt = (P.evaluate(model, f, calib[n], test, ref) for f in fn)
            cells = f"{near['cosine']:.4f} | {near['agreement']:.1f} | {dflt['cosine']:.4f} | {dflt['agreement']:.1f}"
        else:
            r = P.evaluate(model, fn, calib[n], test, ref)
            cells = f"- | - | {r['cosine']:.4f} | {r['agreement']:.1f}"
        lines.append(f"| {name} | {n} | {cells} |")
        print(lines[-1], flush=True)
        if not args.no_write and not args.only:        # after every row: an interrupted run keeps its rows
            write_section(SECTION, _body(args, lines, start))
    print(_body(args, lines, start))


def _body(args, lines: list, start: float) -> str:
    return "\n".join([
        f"EfficientNet-Lite1 (pretrained), {args.n_test} test crops; per-channel LSQ+ weights at 4 bits where named, "
        "every other layer float; activations float unless W4A8. Fidelity to FP32 (top-1 agreement, logit cosine), "
        "not accuracy. On these crops FP32's own top-1 is fragile (the ceiling row of 'Pretrained PTQ vs peers'), so "
        "agreement moves by several points between runs that differ only in thread count; read the cosine first.",
        "", "| layers at W4 | calibration crops | nearest: cosine | nearest: agree % | defaults (GPTQ): cosine "
        "| defaults: agree % |", "|---|---|---|---|---|---|", *lines, "",
        f"{args.threads} threads; {len(lines)} of {len(entries(args.n_calib, args.n_more))} rows in "
        f"{(time.perf_counter() - start) / 60:.1f} min."])


if __name__ == "__main__":
    main()
