"""Empirical bias correction (Nagel et al. 2019, "Data-free quantization", Sec. 4.2, empirical form).

Weight rounding shifts a layer's expected output: E[W x] - E[Q(W) x] = (W - Q(W)) E[x] != 0. After
calibration, ``bias_correct_`` measures that shift per output channel on calibration batches, with
both products on the same float input x (the layer's input before its input quantizer), and adds it
to the layer's bias (a bias-free layer gets a new bias Parameter; build optimizers afterwards).
Idempotent: the applied shift is remembered on the layer (``_slim_bias_correction``), and a second
call replaces it rather than adding to it (``calibrate`` already corrects by default)."""
from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch
from torch import nn

from ..attach import bias_transforms, raw_param, transform_input
from .api import _iterate, quantized_layers
from .bias import Int32Bias

CORRECTION_ATTR = "_slim_bias_correction"


class _Swapped:
    """``layer`` seen with another weight and no bias: the class's own forward (padding, stride,
    groups, static same-padding of third-party convs) runs on it without hooks or parametrizations."""

    def __init__(self, layer: nn.Module, weight: torch.Tensor):
        self.__dict__.update(_layer=layer, weight=weight, bias=None)

    def __getattr__(self, name):
        return getattr(self.__dict__["_layer"], name)


def _weight_error(layer: nn.Module, wq) -> torch.Tensor:
    """W - Q(W): the weight the quantizer receives minus the weight the layer uses."""
    return (transform_input(layer, wq) - layer.weight).detach()


def _channel_mean_dims(layer: nn.Module, y: torch.Tensor) -> tuple[int, ...]:
    if isinstance(layer, nn.Linear):
        ch = y.dim() - 1
    else:                                     # a conv: (N, C, ...) batched, (C, ...) unbatched
        ch = 1 if y.dim() == layer.weight.dim() else 0
    return tuple(d for d in range(y.dim()) if d != ch)


@torch.no_grad()
def bias_correct_(model: nn.Module, forward_loop: Callable | Iterable, num_batches: int | None = None) -> int:
    """For every calibrated layer with a weight quantizer (not Embedding): run ``forward_loop(model)``
    (or the first ``num_batches`` of a loader) once, accumulate the per-output-channel mean over
    batch and spatial positions of ``layer(x; W) - layer(x; Q(W))`` (x: the layer's float input),
    then add it to the bias. Returns the number of layers corrected; train/eval mode is restored."""
    layers, skipped = {}, []
    for name, m, wq, _ in quantized_layers(model):
        if wq is None or isinstance(m, nn.Embedding) or not wq.initialized:
            continue
        if any(not isinstance(t, Int32Bias) for t in bias_transforms(m)):
            skipped.append(name)
            continue
        layers[name] = (m, wq)
    if skipped:
        warnings.warn(f"bias_correct_: skipped layers whose bias has a transform: {skipped}")
    if not layers:
        return 0
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {n: 0 for n in layers}
    errs = {n: _weight_error(m, wq) for n, (m, wq) in layers.items()}

    def hook_for(name, layer):
        def hook(_mod, args):
            y = type(layer).forward(_Swapped(layer, errs[name]), *args).to(torch.float64)
            dims = _channel_mean_dims(layer, y)
            s = y.sum(dim=dims)
            sums[name] = s if name not in sums else sums[name] + s
            counts[name] += y.numel() // s.numel()
        return hook

    # prepend: the hook sees the input before the layer's input quantizer (float x)
    handles = [m.register_forward_pre_hook(hook_for(n, m), prepend=True) for n, (m, _) in layers.items()]
    was_training = model.training
    model.eval()
    try:
        _iterate(forward_loop, model, num_batches)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    _reduce_over_ranks(sums, counts)
    done = 0
    for name, (m, _) in layers.items():
        if name not in sums:
            continue
        delta = (sums[name] / counts[name]).to(m.weight.dtype)
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros_like(delta))
        bias = raw_param(m, "bias")
        old = getattr(m, CORRECTION_ATTR, None)
        if old is not None:                   # replace an earlier correction, never add a second one
            bias.sub_(old.to(bias.dtype))
        bias.add_(delta.to(bias.dtype))
        setattr(m, CORRECTION_ATTR, delta.detach().clone())
        done += 1
    return done


def _reduce_over_ranks(sums: dict, counts: dict) -> None:
    """Under torch.distributed: per-layer output sums and counts summed over ranks (in place)."""
    from .. import distributed as D
    if not D.active():
        return
    names = sorted(sums)
    D.check_same(names, "the layers bias correction saw")
    flat = torch.cat([sums[n].reshape(-1) for n in names]
                     + [torch.tensor([float(counts[n]) for n in names], dtype=torch.float64)])
    D.all_reduce_(flat, "sum")
    i = 0
    for n in names:
        k = sums[n].numel()
        sums[n] = flat[i:i + k].view_as(sums[n])
        i += k
    for j, n in enumerate(names):
        counts[n] = int(flat[i + j])


@torch.no_grad()
def undo_bias_correction_(model: nn.Module) -> list[str]:
    """Take every correction ``bias_correct_`` applied back out of the biases; returns the layers."""
    undone = []
    for name, m in model.named_modules():
        delta = getattr(m, CORRECTION_ATTR, None)
        if delta is None:
            continue
        bias = raw_param(m, "bias")
        bias.sub_(delta.to(bias.dtype))
        delattr(m, CORRECTION_ATTR)
        undone.append(name)
    return undone
