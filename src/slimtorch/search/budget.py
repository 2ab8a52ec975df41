"""Costs in one place: bytes of each layer as the packed file stores it, model totals, FP32 size.

A quantized layer stores its weight bit-packed at ``w_bits`` (ceil(numel * bits / 8) bytes), its
bias and every quantizer parameter (steps, offsets) as float32. Parameters outside quantized layers
(norms, float layers) count 4 bytes each. FP32 size = 4 bytes x every float parameter of the model,
quantizer parameters excluded. The report, penalties, searches and the exporter all use these."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch import nn

from ..attach import QUANTIZABLE, input_quantizer, raw_weight
from ..quant.quantizer import Quantizer

FLOAT_BITS = 32


def layer_kind(module: nn.Module) -> str:
    """'Conv2d', 'Linear', ... (the class slimtorch knows, also for parametrized subclasses)."""
    return next((c.__name__ for c in type(module).__mro__ if c in QUANTIZABLE), type(module).__name__)


def packed_bytes(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


@dataclass
class LayerCost:
    name: str
    kind: str
    params: int          # weight + bias elements
    weight_numel: int
    bias_numel: int
    w_bits: int          # 32 = float
    a_bits: int | None   # None = float input
    qparams: int         # float32 values stored by the layer's quantizers
    bytes: int           # what the packed file stores for this layer

    def as_dict(self):
        return asdict(self)


def layer_cost(name: str, module: nn.Module) -> LayerCost:
    from ..quant.api import weight_quantizer
    w = raw_weight(module)
    bias = getattr(module, "bias", None)
    b_numel = bias.numel() if isinstance(bias, nn.Parameter) or hasattr(bias, "numel") else 0
    wq, aq = weight_quantizer(module), input_quantizer(module)
    w_bits = wq.bits if wq is not None else FLOAT_BITS
    a_bits = aq.bits if isinstance(aq, Quantizer) else None
    qparams = sum(q.num_qparam_values() for q in (wq, aq) if isinstance(q, Quantizer))
    nbytes = packed_bytes(w.numel(), w_bits) + 4 * (b_numel + qparams)
    return LayerCost(name, layer_kind(module), w.numel() + b_numel, w.numel(), b_numel,
                     w_bits, a_bits, qparams, nbytes)


def _is_quantizer_param(name: str, model: nn.Module) -> bool:
    mod_name = name.rsplit(".", 1)[0] if "." in name else ""
    m = model.get_submodule(mod_name) if mod_name else model
    return isinstance(m, Quantizer)


def layer_costs(model: nn.Module) -> list[LayerCost]:
    return [layer_cost(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def model_costs(model: nn.Module) -> dict:
    """Per-layer costs and totals: bytes, fp32_bytes, compression ratio, other float params."""
    rows = layer_costs(model)
    counted = set()
    for n, m in model.named_modules():
        if isinstance(m, QUANTIZABLE):
            counted.add(id(raw_weight(m)))
            if getattr(m, "bias", None) is not None:
                counted.add(id(m.bias))
    float_params, other = 0, 0
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or _is_quantizer_param(name, model):
            continue
        seen.add(id(p))
        float_params += p.numel()
        if id(p) not in counted:
            other += p.numel()
    total = sum(r.bytes for r in rows) + 4 * other
    fp32 = 4 * float_params
    return {"layers": rows, "bytes": total, "fp32_bytes": fp32, "other_params": other,
            "compression": fp32 / total if total else float("inf")}


@dataclass
class LayerShape:
    """Per-sample sizes seen in one forward pass: input/output elements and multiply-accumulates."""
    name: str
    in_numel: int
    out_numel: int
    macs: int


def trace_layers(model: nn.Module, example_input, names=None) -> dict[str, LayerShape]:
    """Run ``model(example_input)`` once (no grad) and record, per quantizable layer, the input and
    output elements per sample and the MACs per sample (Conv: out_numel * fan_in; Linear:
    out_numel * in_features; Embedding: 0). ``example_input``: a tensor or a tuple of args.
    The batch dimension is the first dimension of the layer input."""
    import torch

    out: dict[str, LayerShape] = {}
    hooks = []

    def make(name):
        def hook(mod, args, result):
            x = args[0]
            b = x.shape[0] if x.dim() > 1 else 1
            o = result.numel() // max(b, 1)
            if isinstance(mod, nn.Embedding):
                macs = 0
            else:
                # Linear: in_features; Conv: (in / groups) * kernel = one filter's elements
                macs = o * raw_weight(mod)[0].numel()
            prev = out.get(name)
            out[name] = LayerShape(name, x.numel() // max(b, 1), o, macs + (prev.macs if prev else 0))
        return hook

    for n, m in model.named_modules():
        if isinstance(m, QUANTIZABLE) and (names is None or n in names):
            hooks.append(m.register_forward_hook(make(n)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*args)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return out


def bitops(shapes: dict[str, LayerShape], bits: dict[str, tuple[int, int | None]]) -> int:
    """Sum over layers of MACs x w_bits x a_bits (float activations count 32 bits)."""
    return sum(s.macs * bits[n][0] * (bits[n][1] or FLOAT_BITS) for n, s in shapes.items() if n in bits)
