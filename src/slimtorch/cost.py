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
Uhlich's Eq. 8a weight size) count quantizable layers only.

A product-quantized layer (a weight transform with ``cost_role`` "codebook", pq/codebook.py) stores
its codes bit-packed at ceil(log2 K) bits (ceil(numel / d * ceil(log2 K) / 8) bytes), its K x d
centroids as float32 (4 B each) or int8 + one float32 scale, its bias and any quantizer parameters
as float32 (``codebook_bytes``); fairseq's SizeTracker counts the same (papers.md Sec. 6a).

Activation sizes, MACs, BitOps and the differentiable sizes live in cost_ops.py, re-exported here."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch import nn

from .attach import QUANTIZABLE, input_quantizer, raw_param, raw_weight, transform_input, weight_transforms

FLOAT_BITS = 32
STATE_ROLES = ("quantizer", "mask", "codebook", "noise")    # their parameters and buffers: compression state


# The cost protocol: compression modules declare what they are with a class attribute ``cost_role``,
# so that this foundation module imports nothing from quant/ or prune/ (they import it, downward):
#   "quantizer": ``bits``, ``num_qparam_values()`` (Quantizer, quant/quantizer.py)
#   "mask":      ``mask_for(x) -> bool tensor`` of the weight it receives (prune/mask.py)
#   "fold":      a train-time BatchNorm fold stored inside its layer (quant/bn_qat.py)
#   "noise":     Quant-Noise (pq/noise.py): training-time only, identity in eval, stores and costs nothing
#   "codebook":  ``n_centroids``, ``block_size``, ``index_bits``, ``int8_centroids`` (pq/codebook.py)
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


def weight_codebook(module: nn.Module):
    """The weight transform of ``module`` that is a product-quantization codebook, or None."""
    return next((t for t in weight_transforms(module) if cost_role(t) == "codebook"), None)


def codebook_bytes(numel: int, n_centroids: int, block_size: int, int8_centroids: bool = False) -> tuple[int, int]:
    """(index bytes, centroid bytes) of a weight of ``numel`` elements product-quantized with K
    centroids of d elements: ceil(numel / d * ceil(log2 K) / 8) and 4 K d (or K d + 4 for int8)."""
    bits = max(1, math.ceil(math.log2(n_centroids)))
    cents = n_centroids * block_size
    return packed_bytes(numel // block_size, bits), (cents + 4 if int8_centroids else 4 * cents)


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
    centroids: int = 0               # product quantization: K centroids (0 = not product-quantized)
    block: int = 0                   # product quantization: d, the sub-vector length

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
    cb = weight_codebook(module)
    if cb is not None:                # the codebook replaces the weight (and absorbs any mask before it)
        nbytes = sum(codebook_bytes(w.numel(), cb.n_centroids, cb.block_size, cb.int8_centroids))
        return LayerCost(name, layer_kind(module), w.numel() + b_numel, w.numel(), b_numel, w_bits, a_bits,
                         qparams, nbytes + 4 * (b_numel + qparams), centroids=cb.n_centroids, block=cb.block_size)
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
    return cost_role(m) in STATE_ROLES


def layer_costs(model: nn.Module) -> list[LayerCost]:
    return [layer_cost(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def _qat_folds(model: nn.Module) -> list:
    """Names of train-time BatchNorm folds (quant/bn_qat.py): their BN is stored inside the layer."""
    return [n for n, m in model.named_modules() if cost_role(m) == "fold"]


def state_buffers(model: nn.Module) -> list:
    """[(name, tensor)] of the persistent buffers outside quantizers, each tensor once: what the
    packed file stores besides the layers and parameters (BatchNorm statistics and the like)."""
    quant = [n for n, m in model.named_modules() if cost_role(m) in STATE_ROLES] + _qat_folds(model)
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


from .cost_ops import (LayerShape, _ceil_ste, _quantizable, activation_bytes_tensors, activation_costs,  # noqa: E402,F401
                       activation_layers, bitops, layer_weight_bytes_tensor, quantizer_bits_tensor, trace_layers,
                       weight_bytes, weight_bytes_tensor)
