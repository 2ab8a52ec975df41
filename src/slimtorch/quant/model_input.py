"""Per-channel quantization of the model's own input (issue 11).

A CNN's first layer reads the normalised image (x_c = (p / 255 - mean_c) / std_c, p uint8). One
8-bit step over all channels is coarser than every channel's pixel grid (the union of the channels'
ranges is wider than each), so quantizing it per tensor adds noise the deployed model never sees:
deployment reads uint8 pixels and folds the normalisation into the first layer. One step and offset
per channel, at each channel's min-max over the calibration batches, is that pixel grid (the step
(hi - lo) / 255 = 1 / (255 std_c), the offset lo = -mean_c / std_c when the batches hold a 0 and a 255
pixel in every channel), so it loses nothing.

``calibrate`` finds such quantizers from the forward pass itself: an activation quantizer that asked
for it (``LSQ(model_input="per_channel")``, the default) and whose layer reads a tensor the model was
called with (the same storage: views and slices included) and that is a convolution gets per-channel
ranges along axis 1; every other quantizer keeps its per-tensor observer. Each channel takes its
min-max range with ``a_init="minmax"``; otherwise the lower-error of its min-max range (the pixel grid
at 8 bits) and its MSE-optimal clipping (on a subsample of every batch; at fewer bits clipping wins). Under torch.distributed the ranges are reduced over ranks (min of the
minima, max of the maxima), as the min-max observers are."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .. import distributed as D
from ..attach import input_quantizer

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
KEEP = 1 << 13               # values per channel kept from each batch for the MSE fit


def channel_axis(layer: nn.Module) -> int | None:
    """The channel axis of ``layer``'s input: 1 for a convolution (an image, a spectrogram, a signal);
    None otherwise. A Linear's input features have no pixel grid, and integer kernels (the int8
    runtime, MatMulIntegerToFloat) take one input scale, so Linear inputs stay per tensor."""
    return 1 if isinstance(layer, CONV) else None


def _storages(args, kwargs) -> set:
    out = set()
    for v in list(args) + list(kwargs.values()):
        items = v if isinstance(v, (list, tuple)) else v.values() if isinstance(v, dict) else [v]
        out.update(t.untyped_storage().data_ptr() for t in items if isinstance(t, torch.Tensor))
    return out


class _Ranges:
    """Per-channel min / max (and a subsample) of the model-input tensors the candidate layers read,
    keyed by layer name."""

    def __init__(self, layers: dict):
        self.layers, self.inputs = layers, set()
        self.lo: dict[str, torch.Tensor] = {}
        self.hi: dict[str, torch.Tensor] = {}
        self.samples: dict[str, list] = {}
        self.gen = torch.Generator().manual_seed(0)

    def record(self, name, layer, x):
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point() \
                or x.untyped_storage().data_ptr() not in self.inputs:
            return
        v = x.detach().float().movedim(channel_axis(layer) % x.dim(), 0)
        v = v.reshape(v.shape[0], -1)
        lo, hi = v.amin(dim=1), v.amax(dim=1)
        if name in self.lo and self.lo[name].shape != lo.shape:
            return                                   # channel count changed: leave it per tensor
        self.lo[name] = torch.minimum(self.lo[name], lo) if name in self.lo else lo
        self.hi[name] = torch.maximum(self.hi[name], hi) if name in self.hi else hi
        if v.shape[1] > KEEP:                        # a subsample of every batch, for the MSE fit
            v = v[:, torch.randint(0, v.shape[1], (KEEP,), generator=self.gen).to(v.device)]
        self.samples.setdefault(name, []).append(v)

    def _merged(self) -> dict:
        """{name: (lo, hi, samples)}; under torch.distributed every rank's, merged in rank order."""
        mine = {n: (self.lo[n].cpu(), self.hi[n].cpu(), torch.cat(self.samples[n], 1).cpu()) for n in self.lo}
        if not D.active():
            return mine
        out: dict = {}
        for part in D.all_gather_object(mine):
            for n, (lo, hi, v) in part.items():
                if n in out and out[n][0].shape != lo.shape:
                    continue
                out[n] = (lo, hi, v) if n not in out else (torch.minimum(out[n][0], lo),
                                                           torch.maximum(out[n][1], hi), torch.cat([out[n][2], v], 1))
        return out

    def apply(self) -> list[nn.Module]:
        """Set the per-channel ranges of every quantizer that read a model input; returns them."""
        done, seen, merged = [], set(), self._merged()
        for name, layer in self.layers.items():     # model order: the same on every rank
            q = input_quantizer(layer)
            if name not in merged or q is None or id(q) in seen:
                continue
            seen.add(id(q))
            lo, hi, v = merged[name]
            shape = [1] * layer.weight.dim()
            shape[1] = lo.numel()
            dev = q.scale.device
            q.set_channel_ranges(lo.to(dev), hi.to(dev), v.to(dev), tuple(shape))
            done.append(q)
        return done


@contextmanager
def model_input_ranges(model: nn.Module, layers: dict):
    """While active, record per-channel ranges of the model inputs read by ``layers`` ({name: module}
    whose input quantizer has ``per_channel_input``); yields the recorder (``apply()`` after the pass)."""
    rec, handles = _Ranges(layers), []
    if layers:
        def on_model(_, args, kwargs):       # this call's inputs only: a freed input's address
            rec.inputs = _storages(args, kwargs)  # may hold an activation in a later call

        def hook(name):
            def on_layer(layer, args):
                if args:
                    rec.record(name, layer, args[0])
            return on_layer
        handles.append(model.register_forward_pre_hook(on_model, with_kwargs=True, prepend=True))
        handles += [m.register_forward_pre_hook(hook(n), prepend=True) for n, m in layers.items()]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: layer} with a channel axis whose input quantizer asks for per-channel model-input ranges."""
    return {n: m for n, m in model.named_modules() if channel_axis(m) is not None
            and getattr(input_quantizer(m), "per_channel_input", False)}
