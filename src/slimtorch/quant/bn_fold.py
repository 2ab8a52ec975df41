"""BatchNorm folding into the Conv1d / Conv2d / Linear whose output it reads (Jacob et al. 2018,
Sec. 3.2; Krishnamoorthi 2018, Sec. 3.2). With y = W x + b and BN(y) = gamma (y - mu) / sqrt(var + eps) + beta:

    BN(W x + b) = W' x + b',   W' = W * gamma / sqrt(var + eps)           (per output channel)
                               b' = (b - mu) * gamma / sqrt(var + eps) + beta

Pairs are found without tracing, by one eval-mode forward pass on an example batch: forward hooks
record each layer's output tensor and the tensor each BN reads, and a ``TorchFunctionMode`` records
every other use of a layer's output (a residual add, a second reader, the model output). A BN is
folded only when it reads a layer's output directly, is the only reader, and both run once. The
folded model is then checked on the same batch (relative L2 error <= ``tol``); a pair that breaks
the check is undone and reported. ``train=True`` attaches the QAT form instead (bn_qat.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
# Tensor attribute reads and shape queries: they do not consume the values.
_META = {"size", "dim", "shape", "ndim", "numel", "__len__", "device", "dtype", "is_floating_point",
         "requires_grad", "is_cuda", "layout", "data_ptr", "stride", "is_contiguous", "__get__",
         "_has_compatible_shallow_copy_type", "is_complex", "get_device", "nelement"}


class FoldedBatchNorm(nn.Identity):
    """What a folded BatchNorm becomes: an identity that remembers the layer it was folded into
    (a plain reference, no state), so the packed file can record the fold."""

    def __init__(self, layer: nn.Module | None = None):
        super().__init__()
        self.__dict__["_layer"] = layer

    @property
    def layer(self):
        return self.__dict__["_layer"]

    def extra_repr(self) -> str:
        return "folded into the preceding layer"


@dataclass
class FoldResult:
    """``folded``: [(layer, bn)] pairs folded; ``skipped``: {bn: reason}; ``max_rel_error``: the
    relative L2 error of the model output after folding, on the example batch."""
    folded: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    max_rel_error: float = 0.0

    def __str__(self) -> str:
        lines = [f"folded {a} <- {b}" for a, b in self.folded]
        lines += [f"left {b}: {why}" for b, why in self.skipped.items()]
        return "\n".join(lines) or "no BatchNorm"


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _fname(func) -> str:
    name = getattr(func, "__name__", "") or ""
    if name == "__get__":       # a property read (x.shape, x.T, x.data): name the property
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


class _Recorder(TorchFunctionMode):
    """Records, for every watched tensor (a layer's output), the functions that read it outside
    the BN that consumes it."""

    def __init__(self):
        super().__init__()
        self.watch: dict[int, str] = {}      # id(tensor) -> layer name
        self.keep: list = []                 # strong references: ids stay unique during the pass
        self.uses: dict[str, list] = {}      # layer -> [function names]
        self.inside: set = set()             # layers whose outputs the running BN reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _fname(func)
        if self.watch and name not in _META:
            for t in _tensors((args, kwargs)):
                owner = self.watch.get(id(t))
                if owner is not None and owner not in self.inside:
                    self.uses.setdefault(owner, []).append(name)
        return func(*args, **kwargs)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _run(model, example_input):
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    return model(*args)


def _outputs(out) -> list:
    return [t.detach().float().reshape(-1) for t in _tensors(out)]


def _rel_error(ref: list, new: list) -> float:
    if len(ref) != len(new):
        return float("inf")
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(ref, new))
    den = sum(float(a.pow(2).sum()) for a in ref)
    return (num / den) ** 0.5 if den > 0 else num ** 0.5


@torch.no_grad()
def find_bn_pairs(model: nn.Module, example_input):
    """(pairs [(layer, bn)], skipped {bn: reason}, reference outputs) from one eval-mode pass."""
    names = {id(m): n for n, m in model.named_modules()}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LAYERS)}
    bns = {n: m for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))}
    rec = _Recorder()
    calls: dict[str, int] = {}
    out_dim: dict[str, int] = {}
    reads: dict[str, str | None] = {}      # bn -> layer whose output it reads (None: not a layer's)

    def layer_hook(m, args, out):
        n = names[id(m)]
        calls[n] = calls.get(n, 0) + 1
        if isinstance(out, torch.Tensor):
            out_dim[n] = out.dim()
            rec.watch[id(out)] = n
            rec.keep.append(out)

    def bn_pre(m, args):
        n = names[id(m)]
        calls[n] = calls.get(n, 0) + 1
        owner = rec.watch.get(id(args[0])) if args else None
        reads[n] = owner if calls[n] == 1 else None
        if owner is not None:
            rec.inside.add(owner)

    def bn_post(m, args, out):
        owner = rec.watch.get(id(args[0])) if args else None
        rec.inside.discard(owner)

    handles = [m.register_forward_hook(layer_hook) for m in layers.values()]
    handles += [m.register_forward_pre_hook(bn_pre) for m in bns.values()]
    handles += [m.register_forward_hook(bn_post) for m in bns.values()]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with rec:
            out = _run(model, example_input)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    for t in _tensors(out):
        if id(t) in rec.watch:
            rec.uses.setdefault(rec.watch[id(t)], []).append("the model output")
    pairs, skipped, claimed = [], {}, {}
    for n, bn in bns.items():
        owner = reads.get(n)
        if n not in calls:
            skipped[n] = "not run by the example forward pass"
        elif calls[n] > 1:
            skipped[n] = f"called {calls[n]} times in one forward pass"
        elif owner is None:
            skipped[n] = "its input is not the direct output of a Conv1d/Conv2d/Linear"
        elif calls[owner] > 1:
            skipped[n] = f"its input layer {owner!r} is called {calls[owner]} times in one forward pass"
        elif rec.uses.get(owner):
            used = sorted(set(rec.uses[owner]))
            skipped[n] = f"the output of {owner!r} is also read by {', '.join(used)} (not only this BN)"
        elif not bn.track_running_stats or bn.running_var is None:
            skipped[n] = "it has no running statistics (track_running_stats=False)"
        elif _out_channels(layers[owner]) != bn.num_features:
            skipped[n] = f"{owner!r} has {_out_channels(layers[owner])} outputs, the BN {bn.num_features} features"
        elif isinstance(layers[owner], nn.Linear) and out_dim.get(owner) != 2:
            skipped[n] = f"{owner!r} output is not (batch, features): BatchNorm1d would normalise another axis"
        elif owner in claimed:
            skipped[n] = f"{owner!r} already feeds {claimed[owner]!r}"
        else:
            claimed[owner] = n
            pairs.append((owner, n))
    return pairs, skipped, _outputs(out)


def _out_channels(layer) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def fold_scale(bn: _BatchNorm, dtype=torch.float64) -> torch.Tensor:
    """gamma / sqrt(running_var + eps) per channel (gamma = 1 when the BN is not affine)."""
    std = torch.sqrt(bn.running_var.to(dtype) + bn.eps)
    gamma = bn.weight.to(dtype) if bn.affine else torch.ones_like(std)
    return gamma / std


@torch.no_grad()
def fold_values(layer: nn.Module, bn: _BatchNorm, weight=None, bias=None):
    """(W', b') of the module docstring, computed in float64, cast to the layer's dtype."""
    w = layer.weight if weight is None else weight
    b = layer.bias if bias is None else bias
    scale = fold_scale(bn)
    beta = bn.bias.to(torch.float64) if bn.affine else torch.zeros_like(scale)
    b64 = b.to(torch.float64) if b is not None else torch.zeros_like(scale)
    w_new = w.to(torch.float64) * scale.reshape((-1,) + (1,) * (w.dim() - 1))
    b_new = (b64 - bn.running_mean.to(torch.float64)) * scale + beta
    return w_new.to(w.dtype), b_new.to(w.dtype)


def ensure_bias(layer: nn.Module) -> None:
    """Give a bias-free layer a zero bias Parameter (the fold needs one)."""
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(_out_channels(layer), dtype=layer.weight.dtype,
                                              device=layer.weight.device))


@torch.no_grad()
def _fold_exact(model, layer_name, bn_name):
    """Fold one pair in place; returns a function that undoes it."""
    layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
    old_w, old_b = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
    w, b = fold_values(layer, bn)
    ensure_bias(layer)
    layer.weight.copy_(w)
    layer.bias.copy_(b)
    _set_module(model, bn_name, FoldedBatchNorm(layer))

    def undo():
        layer.weight.copy_(old_w)
        if old_b is None:
            layer.bias = None
        else:
            layer.bias.copy_(old_b)
        _set_module(model, bn_name, bn)
    return undo


def fold_batchnorm_(model: nn.Module, example_input, *, train: bool = False, tol: float = 1e-4,
                    warn: bool = True) -> FoldResult:
    """Fold every BatchNorm1d/2d that reads a Conv1d/Conv2d/Linear output directly, in place, before
    ``quantize_`` (so the quantized weights are the deployed ones); the BN becomes an identity.
    ``train=False``: W', b' of the module docstring are written into the layer (exact, eval mode).
    ``train=True``: the QAT form (bn_qat.py): W * gamma / sqrt(running_var + eps) is a weight
    parametrization stacked before the quantizer, batch statistics are used in training until
    ``freeze_bn_stats``. Returns a :class:`FoldResult` (folded pairs, skipped BNs with the reason,
    measured relative error); skipped BNs are also named in a warning when ``warn``."""
    from .bn_qat import attach_train_fold
    for n, m in model.named_modules():
        if isinstance(m, LAYERS) and (parametrize.is_parametrized(m) or m._modules.get("input_quantizer")):
            raise ConfigError(f"fold_batchnorm_: layer {n!r} is already quantized; fold before quantize_")
    pairs, skipped, ref = find_bn_pairs(model, example_input)
    apply = (lambda ln, bn: attach_train_fold(model, ln, bn)) if train else (lambda ln, bn: _fold_exact(model, ln, bn))
    result = FoldResult(skipped=dict(skipped))

    def check():
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.no_grad():
                return _rel_error(ref, _outputs(_run(model, example_input)))
        finally:
            for m, mode in modes.items():
                m.training = mode

    undos = [apply(*p) for p in pairs]
    err = check() if pairs else 0.0
    if err <= tol:
        result.folded, result.max_rel_error = list(pairs), err
    else:                               # undo all, then fold one pair at a time, keeping what checks
        for u in reversed(undos):
            u()
        for p in pairs:
            undo = apply(*p)
            e = check()
            if e <= tol:
                result.folded.append(p)
                result.max_rel_error = e
            else:
                undo()
                result.skipped[p[1]] = f"folding into {p[0]!r} changed the model output (relative error {e:.2g})"
    if warn and result.skipped:
        import warnings
        warnings.warn("fold_batchnorm_: left unfolded: " + "; ".join(f"{b} ({why})" for b, why in result.skipped.items()),
                      stacklevel=2)
    return result


def folded_pairs(model: nn.Module) -> list:
    """[(layer, bn)] of the folds in ``model`` (exact and QAT form), names relative to ``model``."""
    from .bn_qat import BatchNormFold
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for n, m in model.named_modules():
        if isinstance(m, (FoldedBatchNorm, BatchNormFold)) and m.layer is not None and id(m.layer) in names:
            out.append((names[id(m.layer)], n))
    return out


def apply_fold_structure_(model: nn.Module, pairs) -> None:
    """The shape of a folded model without values (for loading a packed file into a fresh model):
    each BN becomes a :class:`FoldedBatchNorm`, each layer gets a (zero) bias."""
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        if not isinstance(layer, LAYERS) or not isinstance(bn, (_BatchNorm, FoldedBatchNorm)):
            raise ConfigError(f"folded pair ({layer_name!r}, {bn_name!r}) is not a layer and a BatchNorm "
                              f"in this model ({type(layer).__name__}, {type(bn).__name__})")
        ensure_bias(layer)
        _set_module(model, bn_name, FoldedBatchNorm(layer))
