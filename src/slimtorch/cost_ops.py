"""Activation sizes, MACs, BitOps and differentiable weight sizes (split from cost.py, which
re-exports every name here: ``slimtorch.cost`` stays the one cost module to import).

MACs per sample from one traced forward (``trace_layers``), BitOps = MACs x w_bits x a_bits, and the
sizes of Uhlich et al. 2020 (Eq. 8a-c, Table 2) as tensors differentiable in learned bitwidths.
The cost-protocol helpers are imported from cost.py inside the functions (no import cycle)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .attach import QUANTIZABLE, input_quantizer, raw_weight


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
    from .cost import FLOAT_BITS
    return sum(s.macs * bits[n][0] * (bits[n][1] or FLOAT_BITS) for n, s in shapes.items() if n in bits)


# ---------------------------------------------------------------------------------------------
# Activation sizes and differentiable sizes (Uhlich et al. 2020, Eq. 8a-c and Table 2)
# ---------------------------------------------------------------------------------------------
# Activation bytes of a layer = elements of its *quantized input* per sample x a_bits / 8 (rounded up
# to whole bytes). slimtorch quantizes layer inputs, so this counts the feature maps that feed the
# quantized layers (the paper counts the quantized outputs of its nonlinearities; the same maps for a
# chain of layers). Layers whose input stays float are not counted (the paper does not count its float
# input image either). Embeddings have no activation quantizer.

def quantizer_bits_tensor(q, dtype=None):
    """Bits of quantizer ``q`` as a float tensor: differentiable for learned-bit quantizers (their
    ``bits_tensor()``), a constant otherwise; 32 for ``None`` (float)."""
    import torch

    from .cost import FLOAT_BITS

    if q is None:
        return torch.tensor(float(FLOAT_BITS), dtype=dtype or torch.float64)
    fn = getattr(q, "bits_tensor", None)
    b = fn() if callable(fn) else torch.tensor(float(q.bits))
    return b.to(dtype or torch.float64)


def _ceil_ste(x):
    return x.ceil().detach() + (x - x.detach())


def layer_weight_bytes_tensor(module: nn.Module, bias_bits: bool = False):
    """Differentiable bytes of one layer's weights. Default: as the packed file stores it (weights at
    w_bits, bias and quantizer parameters float32; value = ``layer_cost(...).bytes``). ``bias_bits``:
    the paper's Table 2, (weights + bias) x b_w / 8, no quantizer parameters."""
    import torch

    from .cost import is_quantizer, layer_cost, weight_codebook, weight_quantizer
    if weight_codebook(module) is not None:     # product-quantized: a fixed size, no learned bits
        return torch.tensor(float(layer_cost("", module).bytes), dtype=torch.float64)
    wq, aq = weight_quantizer(module), input_quantizer(module)
    w = raw_weight(module).numel()
    bias = getattr(module, "bias", None)
    nb = bias.numel() if bias is not None and hasattr(bias, "numel") else 0
    b = quantizer_bits_tensor(wq)
    if bias_bits:
        return _ceil_ste((w + nb) * b / 8)
    qparams = sum(q.num_qparam_values() for q in (wq, aq) if is_quantizer(q))
    return _ceil_ste(w * b / 8) + torch.tensor(4.0 * (nb + qparams), dtype=b.dtype)


def weight_bytes_tensor(model: nn.Module, bias_bits: bool = False):
    """Sum of :func:`layer_weight_bytes_tensor` over the quantizable layers (the paper's S^w, Eq. 8a;
    float parameters outside those layers, e.g. norms, are not included)."""
    return sum(layer_weight_bytes_tensor(m, bias_bits) for m in _quantizable(model))


def weight_bytes(model: nn.Module, bias_bits: bool = False) -> int:
    """Integer value of :func:`weight_bytes_tensor` (= sum of ``layer_cost(..).bytes`` by default)."""
    import torch

    with torch.no_grad():
        return int(round(float(weight_bytes_tensor(model, bias_bits))))


def _quantizable(model):
    return [m for m in model.modules() if isinstance(m, QUANTIZABLE)]


def activation_layers(model: nn.Module):
    """(name, module, input_quantizer) of every layer whose input is quantized."""
    from .cost import is_quantizer
    return [(n, m, input_quantizer(m)) for n, m in model.named_modules()
            if isinstance(m, QUANTIZABLE) and is_quantizer(input_quantizer(m))]


def activation_bytes_tensors(model: nn.Module, shapes: dict | None = None) -> dict:
    """{layer: differentiable bytes per sample of its quantized input} (Table 2's S^x). Elements per
    sample come from ``shapes`` (``trace_layers``) or, for learned-bit quantizers, from the last
    forward pass (``sample_numel``)."""
    from .errors import ConfigError
    out = {}
    for name, _, aq in activation_layers(model):
        numel = shapes[name].in_numel if shapes is not None and name in shapes else \
            getattr(aq, "sample_numel", None)
        if numel is None:
            raise ConfigError(f"activation size of layer {name!r} is unknown: run one forward pass "
                              "first or pass shapes=trace_layers(model, example_input)")
        out[name] = _ceil_ste(numel * quantizer_bits_tensor(aq) / 8)
    return out


def activation_costs(model: nn.Module, example_input=None, shapes: dict | None = None) -> dict:
    """Per-sample activation bytes per layer (ints) with their sum and max (Eq. 8b, 8c), from
    ``trace_layers(model, example_input)`` or given ``shapes``."""
    import torch

    if shapes is None and example_input is not None:
        shapes = trace_layers(model, example_input)
    with torch.no_grad():
        per = {n: int(t) for n, t in activation_bytes_tensors(model, shapes).items()}
    return {"layers": per, "sum": sum(per.values()), "max": max(per.values(), default=0)}
