"""Costs in one place (the foundation module quant/, prune/, search/, export/ and the report import):
bytes of each layer as the packed file stores it, model totals, FP32 size, pruning masks' bytes and
sparsity, activation sizes, MACs and BitOps.

A pruned layer (a weight transform with ``cost_role`` "mask") also reports ``kept`` weights,
``sparsity``, ``mask_bytes`` (bitmap of ceil(numel / 8) bytes or index list of kept * 1/2/4/8
bytes, whichever is smaller) and ``sparse_bytes`` (kept codes + mask + float32 bias and quantizer
parameters); ``bytes`` stays the dense size (codes of W * M). The packed file stores a pruned
quantized layer sparse when that is smaller (``stores_sparse`` / ``stored_bytes``).

A quantized layer stores its weight bit-packed at ``w_bits`` (ceil(numel * bits / 8) bytes), its
bias and every quantizer parameter (steps, offsets) as float32 (``layer_cost``). The model total
(``model_costs``) adds everything else the packed file must carry: parameters outside quantized
layers (norms, float layers) and every persistent buffer that does not belong to a quantizer
(BatchNorm running_mean / running_var / num_batches_tracked, or any registered buffer), each at its
stored width (a BatchNorm folded into its layer, quant/bn_fold.py / bn_qat.py, is not stored) (element_size: 4 B for float32, 8 B for int64). Quantizer buffers (bits, signedness)
are configuration the file keeps in its header, not tensors, and are not counted; neither are
non-persistent buffers. Shared tensors count once. FP32 size = 4 bytes x every float parameter
(quantizer parameters excluded) + the same buffers (a float checkpoint stores them too). The report,
penalties, searches and the exporter all use these; the per-layer costs (HAWQ's per-layer options,
Uhlich's Eq. 8a weight size) count quantizable layers only."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch import nn

from .attach import QUANTIZABLE, input_quantizer, raw_param, raw_weight, transform_input, weight_transforms

FLOAT_BITS = 32


# The cost protocol: compression modules declare what they are with a class attribute ``cost_role``,
# so that this foundation module imports nothing from quant/ or prune/ (they import it, downward):
#   "quantizer": ``bits``, ``num_qparam_values()`` (Quantizer, quant/quantizer.py)
#   "mask":      ``mask_for(x) -> bool tensor`` of the weight it receives (prune/mask.py)
#   "fold":      a train-time BatchNorm fold stored inside its layer (quant/bn_qat.py)
#   "noise":     Quant-Noise (pq/noise.py): training-time only, identity in eval, stores and costs nothing
# Parameters and buffers of modules with a cost_role are compression state, not model weights.

def cost_role(module) -> str | None:
    return getattr(module, "cost_role", None)


def is_quantizer(q) -> bool:
    return cost_role(q) == "quantizer"


def weight_quantizer(module: nn.Module):
    """The first weight transform of ``module`` that is a quantizer, or None."""
    return next((t for t in weight_transforms(module) if is_quantizer(t)), None)


def weight_mask(module: nn.Module):
    """The first weight transform of ``module`` that is a pruning mask, or None."""
    return next((t for t in weight_transforms(module) if cost_role(t) == "mask"), None)


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
    bytes: int           # what the packed file stores for this layer (dense: every weight's code)
    kept: int = -1       # weights the pruning mask keeps (= weight_numel without a mask)
    sparsity: float = 0.0            # fraction of the weights pruned
    mask_bytes: int = 0              # the mask, as a bitmap or an index list, whichever is smaller
    mask_format: str | None = None   # "bitmap" | "index" | None (no mask)
    sparse_bytes: int = -1           # stored sparse: kept codes + mask + float32 bias/qparams

    def __post_init__(self):
        if self.kept < 0:
            self.kept = self.weight_numel
        if self.sparse_bytes < 0:
            self.sparse_bytes = self.bytes

    def as_dict(self):
        return asdict(self)


def index_bytes(numel: int) -> int:
    """Bytes of one entry of an index list into ``numel`` weights: 1, 2, 4 or 8 (uint8..uint64)."""
    return next(w for w in (1, 2, 4, 8) if numel <= 256 ** w)


def mask_bytes(numel: int, kept: int) -> tuple[int, str]:
    """(bytes, format) of a mask keeping ``kept`` of ``numel`` weights: a bitmap (ceil(numel / 8)
    bytes) or the list of kept flat indices (``kept * index_bytes(numel)``), whichever is smaller
    (the bitmap on a tie)."""
    bitmap, index = math.ceil(numel / 8), kept * index_bytes(numel)
    return (index, "index") if index < bitmap else (bitmap, "bitmap")


def stores_sparse(row: LayerCost) -> bool:
    """Whether the packed file stores this pruned, quantized layer sparse (its ``mask_format`` mask
    + the kept weights' codes, ``sparse_bytes``): when that is smaller than the dense codes."""
    return row.mask_format is not None and row.w_bits <= 8 and row.sparse_bytes < row.bytes


def stored_bytes(row: LayerCost) -> int:
    """Bytes the packed file spends on this layer: ``sparse_bytes`` when ``stores_sparse``, else ``bytes``."""
    return row.sparse_bytes if stores_sparse(row) else row.bytes


def layer_mask(module: nn.Module):
    """The current bool mask of ``module``'s weight (None when it has no pruning mask)."""
    mk = weight_mask(module)
    if mk is None:
        return None
    import torch

    with torch.no_grad():
        return mk.mask_for(transform_input(module, mk).detach())


def layer_cost(name: str, module: nn.Module) -> LayerCost:
    w = raw_weight(module)
    bias = getattr(module, "bias", None)
    b_numel = bias.numel() if isinstance(bias, nn.Parameter) or hasattr(bias, "numel") else 0
    wq, aq = weight_quantizer(module), input_quantizer(module)
    w_bits = wq.bits if wq is not None else FLOAT_BITS
    a_bits = aq.bits if is_quantizer(aq) else None
    qparams = sum(q.num_qparam_values() for q in (wq, aq) if is_quantizer(q))
    nbytes = packed_bytes(w.numel(), w_bits) + 4 * (b_numel + qparams)
    row = LayerCost(name, layer_kind(module), w.numel() + b_numel, w.numel(), b_numel,
                    w_bits, a_bits, qparams, nbytes)
    mask = layer_mask(module)
    if mask is not None:
        row.kept = int(mask.sum())
        row.sparsity = 1 - row.kept / max(w.numel(), 1)
        row.mask_bytes, row.mask_format = mask_bytes(w.numel(), row.kept)
        row.sparse_bytes = packed_bytes(row.kept, w_bits) + row.mask_bytes + 4 * (b_numel + qparams)
    return row


def _is_quantizer_param(name: str, model: nn.Module) -> bool:
    mod_name = name.rsplit(".", 1)[0] if "." in name else ""
    m = model.get_submodule(mod_name) if mod_name else model
    return cost_role(m) in ("quantizer", "mask")


def layer_costs(model: nn.Module) -> list[LayerCost]:
    return [layer_cost(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def _qat_folds(model: nn.Module) -> list:
    """Names of train-time BatchNorm folds (quant/bn_qat.py): their BN is stored inside the layer."""
    return [n for n, m in model.named_modules() if cost_role(m) == "fold"]


def state_buffers(model: nn.Module) -> list:
    """[(name, tensor)] of the persistent buffers outside quantizers, each tensor once: what the
    packed file stores besides the layers and parameters (BatchNorm statistics and the like)."""
    quant = [n for n, m in model.named_modules() if cost_role(m) in ("quantizer", "mask")] + _qat_folds(model)
    out, seen = [], set()
    for mod_name, m in model.named_modules():
        if any(mod_name == q or mod_name.startswith(q + ".") for q in quant):
            continue
        for b_name, b in m._buffers.items():
            if b is None or b_name in m._non_persistent_buffers_set or id(b) in seen:
                continue
            seen.add(id(b))
            out.append((f"{mod_name}.{b_name}" if mod_name else b_name, b))
    return out


def model_costs(model: nn.Module) -> dict:
    """Per-layer costs and totals. ``sparse_bytes``: the same with every pruned layer stored sparse
    (kept codes + mask, ``LayerCost.sparse_bytes``); ``stored_bytes``: what the packed file stores
    (each pruned quantized layer sparse where that is smaller, ``stored_bytes``); ``weights`` / ``kept`` / ``sparsity``: over the
    quantizable layers. ``bytes`` = sum of the layer bytes + ``other_param_bytes`` (float
    parameters outside quantizable layers, at their width) + ``buffer_bytes`` (``state_buffers`` at
    their width): what an ideal file of this model must store. Also ``fp32_bytes``, ``compression``
    (fp32 / bytes), ``other_params`` and ``buffers`` (element counts)."""
    rows = layer_costs(model)
    counted = set()
    for n, m in model.named_modules():
        if isinstance(m, QUANTIZABLE):
            counted.add(id(raw_weight(m)))
            if raw_param(m, "bias") is not None:
                counted.add(id(raw_param(m, "bias")))
    float_params, other, other_bytes = 0, 0, 0
    seen = set()
    folds = tuple(f + "." for f in _qat_folds(model))
    for name, p in model.named_parameters():
        if id(p) in seen or _is_quantizer_param(name, model) or (folds and name.startswith(folds)):
            continue
        seen.add(id(p))
        float_params += p.numel()
        if id(p) not in counted:
            other += p.numel()
            other_bytes += p.numel() * p.element_size()
    bufs = [b for _, b in state_buffers(model)]
    buf_bytes = sum(b.numel() * b.element_size() for b in bufs)
    total = sum(r.bytes for r in rows) + other_bytes + buf_bytes
    fp32 = 4 * float_params + buf_bytes
    sparse = sum(r.sparse_bytes for r in rows) + other_bytes + buf_bytes
    stored = sum(stored_bytes(r) for r in rows) + other_bytes + buf_bytes
    weights, kept = sum(r.weight_numel for r in rows), sum(r.kept for r in rows)
    return {"layers": rows, "bytes": total, "fp32_bytes": fp32, "params": float_params,
            "sparse_bytes": sparse, "stored_bytes": stored, "weights": weights, "kept": kept,
            "sparsity": 1 - kept / weights if weights else 0.0,
            "other_params": other, "other_param_bytes": other_bytes,
            "buffers": sum(b.numel() for b in bufs), "buffer_bytes": buf_bytes,
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
