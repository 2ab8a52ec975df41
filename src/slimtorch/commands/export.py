"""``slimtorch export FILE.slim --onnx OUT.onnx``: packed model -> ONNX (QDQ) for onnxruntime."""
from __future__ import annotations

import json

from ..errors import ConfigError


def add_model_args(p) -> None:
    p.add_argument("--model", default=None,
                   help="zoo name or package.module:factory (default: the file's build record)")
    p.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments of the model factory")
    p.add_argument("--input-shape", default=None, help="per-sample input shape, e.g. 1,28,28")
    p.add_argument("--seq", type=int, default=128, help="sequence length for HF encoders (default 128)")


def model_from_args(args, path, runtime="fakequant"):
    """(model loaded from the packed file, build record, example-input maker(batch))."""
    import torch

    from ..export.modelspec import build_from_spec, example_inputs, zoo_spec
    from ..export.packed import load_packed, read_packed

    meta = read_packed(path)[0]
    spec = meta.get("build")
    if args.model:
        try:
            kwargs = json.loads(args.model_kwargs)
        except ValueError as e:
            raise ConfigError(f"--model-kwargs is not valid JSON: {e}") from None
        spec = zoo_spec(args.model, **kwargs)
    if not spec:
        raise ConfigError(f"{path} does not record its model: pass --model NAME_OR_IMPORT_PATH")
    model = load_packed(path, lambda: build_from_spec(spec), runtime=runtime)

    def make(batch):
        if args.input_shape:
            shape = [int(s) for s in args.input_shape.split(",")]
            return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
        return example_inputs(model, spec, batch, args.seq)

    return model, spec, make


def register(sub) -> None:
    p = sub.add_parser("export", help="export a packed model to ONNX (QuantizeLinear/DequantizeLinear)",
                       description="Load FILE.slim into its float architecture and write an ONNX model "
                                   "with QDQ nodes for onnxruntime; checks it against PyTorch.")
    p.add_argument("file", help="packed model (.slim) written by save_packed / slimtorch run")
    p.add_argument("--onnx", required=True, help="output .onnx path")
    p.add_argument("--matmul-nbits", type=int, default=0, metavar="BLOCK",
                   help="emit com.microsoft MatMulNBits for <=4-bit Linear weights (block size, e.g. 128)")
    p.add_argument("--kernels", choices=("qdq", "ort"), default="qdq",
                   help="qdq: standard ONNX (any runtime); ort: onnxruntime MatMulIntegerToFloat with fused bias")
    p.add_argument("--exact", action="store_true",
                   help="keep onnxruntime on float kernels (PyTorch's arithmetic; slower)")
    p.add_argument("--fuse-skip-layernorm", action="store_true",
                   help="let onnxruntime fuse Add + LayerNorm into SkipLayerNormalization (fast on GPU "
                        "providers; on the CPU 2.6x the kernel time of the default rewrite on MiniLM)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    add_model_args(p)
    p.set_defaults(func=_export)


def _export(args) -> int:
    import numpy as np
    import torch

    from ..export.modelspec import HFEncoder
    from ..export.onnx_export import export_onnx, ort_session

    model, spec, make = model_from_args(args, args.file)
    hf = spec.get("source") == "hf"
    if hf and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")   # exports to a graph onnxruntime runs faster
    net = HFEncoder(model) if hf else model
    ex = make(2)
    dyn = None
    if hf:
        b, s = torch.export.Dim("batch"), torch.export.Dim("seq", min=2, max=512)
        dyn = {k: {0: b, 1: s} for k in ex}
    path = export_onnx(net, args.onnx, ex, output_names=["output"], matmul_nbits=args.matmul_nbits,
                       kernels=args.kernels, exact=args.exact, fuse_skip_layernorm=args.fuse_skip_layernorm, **({"dynamic_shapes": dyn} if dyn else {}))
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    if not args.no_check:
        x = make(8)
        feeds = {k: v.numpy() for k, v in x.items()} if isinstance(x, dict) else {
            ort_session(path).get_inputs()[0].name: x.numpy()}
        with torch.no_grad():
            want = (net(**x) if isinstance(x, dict) else net(x)).numpy()
        got = ort_session(path).run(None, feeds)[0]
        diff = float(np.abs(got - want).max())
        line = f"onnxruntime vs PyTorch on 8 examples: max abs diff {diff:.3g} (output scale {np.abs(want).max():.3g})"
        if not hf and want.ndim == 2:
            line += f", argmax agreement {100 * float((got.argmax(1) == want.argmax(1)).mean()):.1f}%"
        print(line)
    return 0
