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
at 8 bits) and its MSE-optimal clipping (on a subsample of every batch; at fewer bits clipping wins).
Under torch.distributed every rank's ranges and samples are gathered and merged (min of the minima,
max of the maxima, samples in rank order), so every rank sets the same steps."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .. import distributed as D
from ..attach import input_quantizer
from .init import _mse, minmax_init, mse_init

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
KEEP = 1 << 13               # values per channel kept from each batch for the MSE fit
CAP = 1 << 15                # ... and in all (mse_init uses at most max(2^15 / C, 4096) per channel)


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
        self.invalid: set = set()
        self.gen = torch.Generator().manual_seed(0)

    def record(self, name, layer, x):
        if not isinstance(x, torch.Tensor) or x.dim() != layer.weight.dim() or not x.is_floating_point() \
                or x.untyped_storage().data_ptr() not in self.inputs or name in self.invalid:
            return                                   # batched (N, C, ...) model inputs only
        v = x.detach().float().movedim(1, 0)
        v = v.reshape(v.shape[0], -1)
        if v.shape[0] != layer.in_channels or (name in self.lo and self.lo[name].shape[0] != v.shape[0]):
            self.invalid.add(name)                   # not the layer's channels: leave it per tensor
            return
        lo, hi = v.amin(dim=1), v.amax(dim=1)
        self.lo[name] = torch.minimum(self.lo[name], lo) if name in self.lo else lo
        self.hi[name] = torch.maximum(self.hi[name], hi) if name in self.hi else hi
        keep = self.samples.setdefault(name, [])
        keep.append(self._subsample(v, KEEP).clone())    # a copy: a loader may reuse its buffer
        if sum(t.shape[1] for t in keep) > 2 * CAP:      # bounded memory over any number of batches
            keep[:] = [self._subsample(torch.cat(keep, 1), CAP)]

    def _subsample(self, v, k):
        if v.shape[1] <= k:
            return v
        return v[:, torch.randperm(v.shape[1], generator=self.gen)[:k].to(v.device)]

    def _merged(self) -> dict:
        """{name: (lo, hi, samples)}; under torch.distributed every rank's, merged in rank order."""
        mine = {n: (self.lo[n].cpu(), self.hi[n].cpu(),
                    self._subsample(torch.cat(self.samples[n], 1), CAP).cpu())
                for n in self.lo if n not in self.invalid}
        if not D.active() or not self.layers:        # no candidate: the same on every rank, no collective
            return mine
        out: dict = {}
        parts = D.all_gather_object((mine, sorted(self.invalid)))
        bad = {n for _, inv in parts for n in inv}
        for part, _ in parts:
            for n, (lo, hi, v) in part.items():
                if n in bad:
                    continue
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
            q.set_channel_steps(*channel_steps(q, lo.to(dev), hi.to(dev), v.to(dev), tuple(shape)))
            done.append(q)
        return done


@torch.no_grad()
def channel_steps(q, lo: torch.Tensor, hi: torch.Tensor, samples: torch.Tensor, shape: tuple):
    """(step, offset) per channel for quantizer ``q``: each channel's min-max range ``lo`` / ``hi`` (C,),
    mapped as ``minmax_init`` maps a range, or its MSE-optimal clipping on ``samples`` (C, N), whichever
    has the lower error on the samples plus the extremes (min-max only with ``init="minmax"``); both
    shaped ``shape``. An unsigned-or-signed choice still open is made from the data first."""
    lo, hi = lo.float(), hi.float()
    if q.signed is None:
        q._signed.fill_(int(bool(lo.min() < 0)))
        q._sync()
    v = torch.cat([samples.float(), lo[:, None], hi[:, None]], 1)
    s, b = minmax_init(torch.stack([lo, hi], 1), q.q_n, q.q_p, (len(lo), 1), q.learn_offset)
    if q.init != "minmax":
        s2, b2, _ = mse_init(v, q.q_n, q.q_p, q.learn_offset, scale_shape=(len(lo), 1))
        better = (_mse(v, s2.reshape(-1), None if b2 is None else b2.reshape(-1), q.q_n, q.q_p)
                  < _mse(v, s.reshape(-1), None if b is None else b.reshape(-1), q.q_n, q.q_p))[:, None]
        s = torch.where(better, s2, s)
        b = None if b is None else torch.where(better, b2, b)
    like = q.scale.detach()
    return s.reshape(shape).to(like), None if b is None else b.reshape(shape).to(like)


@contextmanager
def model_input_ranges(model: nn.Module, layers: dict):
    """While active, record per-channel ranges of the model inputs read by ``layers`` ({name: module}
    whose input quantizer has ``per_channel_input``); yields the recorder (``apply()`` after the pass)."""
    rec, handles = _Ranges(layers), []
    if layers:
        def on_model(_, args, kwargs):       # this call's inputs only, while it runs: a freed
            rec.inputs = _storages(args, kwargs)  # input's address may hold an activation later

        def after_model(*_):
            rec.inputs = set()

        def hook(name):
            def on_layer(layer, args):
                if args:
                    rec.record(name, layer, args[0])
            return on_layer
        handles.append(model.register_forward_pre_hook(on_model, with_kwargs=True, prepend=True))
        handles.append(model.register_forward_hook(after_model, always_call=True))
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
