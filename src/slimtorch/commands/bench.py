"""``slimtorch bench FILE``: CPU latency percentiles of a packed (.slim) or ONNX model."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .export import add_model_args, model_from_args


def register(sub) -> None:
    p = sub.add_parser("bench", help="CPU latency percentiles (p50/p90/p99) at batch 1 and 32",
                       description="Time FILE: a .slim packed model (PyTorch, loaded with load_packed) or "
                                   "an .onnx model (onnxruntime CPU).")
    p.add_argument("file", help=".slim or .onnx")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=30.0, help="time cap per batch size")
    p.add_argument("--runtime", choices=("float", "fakequant", "int8"), default="float",
                   help="load_packed runtime for .slim files")
    p.add_argument("--profile", action="store_true",
                   help="also print the time per operator type at the largest batch (where the time goes)")
    add_model_args(p)
    p.set_defaults(func=_bench)


def _onnx_inputs(sess, batch, seq, shape):
    import numpy as np
    feeds = {}
    for i in sess.get_inputs():
        if "int" in i.type:
            dims = [batch, seq][: len(i.shape)]
            feeds[i.name] = (np.ones(dims, np.int64) if "mask" in i.name else
                             np.random.default_rng(0).integers(5, 1000, dims).astype(np.int64))
        else:
            rest = shape or [d if isinstance(d, int) else None for d in i.shape[1:]]
            if any(d is None for d in rest):
                raise ConfigError(f"input {i.name!r} has dynamic dims {i.shape}: give --input-shape")
            feeds[i.name] = np.random.default_rng(0).standard_normal([batch, *rest]).astype(np.float32)
    return feeds


def _bench(args) -> int:
    import torch

    from ..runtime.bench import latency

    torch.set_num_threads(args.threads)
    path = Path(args.file)
    if path.suffix == ".onnx":
        from ..export.onnx_export import ort_session
        sess = ort_session(path, threads=args.threads)
        shape = [int(s) for s in args.input_shape.split(",")] if args.input_shape else None
        feeds = {b: _onnx_inputs(sess, b, args.seq, shape) for b in args.batch}
        runs = {b: (lambda f=f: sess.run(None, f)) for b, f in feeds.items()}
        what = f"onnxruntime {args.threads} threads"
    else:
        model, spec, make = model_from_args(args, path, runtime=args.runtime)
        runs = {}
        for b in args.batch:
            x = make(b)
            runs[b] = (lambda x=x: model(**x)) if isinstance(x, dict) else (lambda x=x: model(x))
        what = f"PyTorch {args.threads} threads, runtime={args.runtime}"
    print(f"{path.name}: {what}")
    print(f"{'batch':>5}  {'p50 ms':>9}  {'p90 ms':>9}  {'p99 ms':>9}  {'runs':>4}")
    with torch.inference_mode():
        for b, fn in runs.items():
            r = latency(fn, args.runs, args.warmup, args.max_seconds)
            print(f"{b:>5}  {r['p50']:9.2f}  {r['p90']:9.2f}  {r['p99']:9.2f}  {r['n']:>4}")
        if args.profile:
            from ..runtime.op_profile import format_profile, onnx_op_profile, torch_op_profile
            b = max(args.batch)
            rows = (onnx_op_profile(path, feeds[b], threads=args.threads) if path.suffix == ".onnx"
                    else torch_op_profile(runs[b]))
            print(format_profile(rows, f"\nbatch {b}: time per operator type (3 runs after a warm-up)"))
    return 0
