"""AdaRound: learned rounding of the weights after calibration (Nagel et al. 2020, "Up or Down?
Adaptive Rounding for Post-Training Quantization").

Each weight is rounded to floor(W/s) + h(V) with h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)
(Eq. 23, zeta = 1.1, gamma = -0.1), V initialised so that h(V) = W/s - floor(W/s). Layer by layer,
in the order the forward pass runs them, V minimises (Eq. 25, asymmetric reconstruction)

    || y_fp - layer(x_q; s (floor(W/s) + h(V))) ||^2  +  lambda * sum_i (1 - |2 h(V_i) - 1|^beta)   (Eq. 24)

with x_q the layer's input in the model whose earlier layers are already rounded (its own input
quantizer applied) and y_fp the float model's output of that layer. beta anneals from 20 to 2 after
a warm-up without the regulariser (20% of the iterations). When a BatchNorm reads the layer's output
the squared error of channel c is weighted by (gamma_c / sqrt(var_c + eps))^2, i.e. the error is
measured after the BN, where a low-variance channel's error is amplified (depthwise convs).

At the end h is set to 0 or 1 (if that reconstructs the calibration data worse than rounding to
nearest, e.g. after too few iterations, the layer keeps nearest) and the stored weight becomes the rounded value s * q (+ offset), so the
layer's quantizer reproduces it exactly and everything downstream (QAT, bias correction, packed
export, ONNX) sees the learned rounding. The step sizes are not changed. A bias correction already
applied (``calibrate`` applies one by default) is taken out first and measured again at the end."""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..attach import input_quantizer, raw_weight, weight_transforms
from ..errors import ConfigError
from .batches import run_batch
from .api import quantized_layers
from .bias_correction import bias_correct_, undo_bias_correction_
from .quantizer import Quantizer

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) of Eq. 23."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(frac: torch.Tensor) -> torch.Tensor:
    """V with h(V) = frac (the fractional part of W/s), the inverse of Eq. 23."""
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def round_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """sum_i 1 - |2 h_i - 1|^beta (Eq. 24): zero only when every h is 0 or 1."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def beta_at(it: int, iters: int, warmup: float, beta: tuple[float, float]) -> float | None:
    """Annealed beta (linear from beta[0] to beta[1] after the warm-up); None during the warm-up."""
    start = int(warmup * iters)
    if it < start:
        return None
    t = (it - start) / max(iters - start, 1)
    return beta[1] + (beta[0] - beta[1]) * (1 - t)


@dataclass
class AdaRoundResult:
    """Per layer: (iterations run, loss before, loss after); skipped layers with the reason."""
    layers: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self):
        lines = [f"AdaRound: {len(self.layers)} layers in {self.seconds:.1f} s"]
        lines += [f"  {n}: {it} iters, reconstruction {a:.4g} -> {b:.4g}" for n, (it, a, b) in self.layers.items()]
        lines += [f"  skipped {n}: {why}" for n, why in self.skipped.items()]
        return "\n".join(lines)


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the wanted tensors are recorded."""


def _float_copy(model: nn.Module) -> nn.Module:
    """A deep copy in which every quantizer passes its input through (the float model)."""
    ref = copy.deepcopy(model)
    for q in ref.modules():
        if isinstance(q, Quantizer):
            q.forward = lambda x: x            # instance attribute: wins over the class forward
    return ref.eval()


def _batches(data) -> list:
    if callable(data):
        raise ConfigError("adaround_ needs the calibration data as a list or loader of batches "
                          "(it replays them layer by layer), not a forward_loop callable")
    out = []
    for b in data:
        x = b[0] if isinstance(b, (list, tuple)) else b
        out.append(x)
    if not out:
        raise ConfigError("adaround_ got no calibration batches")
    return out


@torch.no_grad()
def _capture(model: nn.Module, layer: nn.Module, batches: list, output: bool) -> list[torch.Tensor]:
    """The inputs (before the input quantizer) or outputs of ``layer`` for every batch; each forward
    stops as soon as the layer has run (a layer run several times per pass keeps only its first call)."""
    got: list[torch.Tensor] = []

    def pre(_m, args):
        got.append(args[0].detach())
        raise _Stop

    def post(_m, _args, out):
        got.append(out.detach())
        raise _Stop

    h = layer.register_forward_hook(post) if output else layer.register_forward_pre_hook(pre, prepend=True)
    device = next(model.parameters()).device
    try:
        for x in batches:
            try:
                run_batch(model, x, device)
            except _Stop:
                pass
    finally:
        h.remove()
    return got


@contextlib.contextmanager
def _input_quantized_once(layer: nn.Module, xs: list[torch.Tensor]):
    """Yield ``xs`` through the layer's input quantizer, with that quantizer bypassed meanwhile: its
    output does not depend on V, so it is computed once instead of at every iteration."""
    aq = input_quantizer(layer)
    if aq is None:
        yield xs
        return
    with torch.no_grad():
        xq = [aq(x) for x in xs]
    object.__setattr__(aq, "forward", _identity)
    try:
        yield xq
    finally:
        del aq.forward


def _identity(x):
    return x


def _samples(tensors: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """The captured batches re-cut into chunks of ``size`` samples (along dim 0)."""
    return [c for t in tensors for c in torch.split(t, size)]


def _bn_weights(ref: nn.Module, example) -> dict[str, torch.Tensor]:
    """layer name -> per-channel (gamma / sqrt(var + eps))^2 of the BatchNorm reading its output
    (``ref``: the float copy of the model)."""
    from .bn_fold import find_bn_pairs
    try:
        pairs, _, _ = find_bn_pairs(ref, example)
    except Exception:                  # a model the recorder cannot follow: unweighted errors
        return {}
    mods = dict(ref.named_modules())
    out = {}
    for layer, bn in pairs:
        b = mods[bn]
        g = b.weight.detach() if b.weight is not None else torch.ones_like(b.running_var)
        out[layer] = (g / torch.sqrt(b.running_var + b.eps)).pow(2).float()
    return out


class _Soft(nn.Module):
    """Stands in for the weight quantizer while V is learned: s (clamp(floor(u) + h(V))) + offset."""

    def __init__(self, wq: Quantizer, w: torch.Tensor):
        super().__init__()
        p = wq.quant_params()
        self.scale, self.offset, self.q_n, self.q_p = p["scale"], p["offset"], p["q_n"], p["q_p"]
        u = (w - self.offset) / self.scale if self.offset is not None else w / self.scale
        self.floor = torch.floor(u).detach()
        self.v = nn.Parameter(init_v(u - self.floor))

    def values(self, h: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(self.floor + h, self.q_n, self.q_p)
        return q * self.scale + self.offset if self.offset is not None else q * self.scale

    def forward(self, _x):
        return self.values(rectified_sigmoid(self.v))

    def hard(self) -> torch.Tensor:
        return self.values((self.v >= 0).to(self.v.dtype)).detach()


def _loss(y, target, weight, ch: int):
    """Squared error summed over the output channels (dim ``ch``), averaged over the rest; channel
    c weighted by ``weight[c]`` when given."""
    err = (y - target).pow(2)
    if weight is not None:
        shape = [1] * err.dim()
        shape[ch] = -1
        err = err * weight.view(shape)
    return err.sum(ch).mean()


def _optimise(layer, wq, xs, ys, weight, iters, lam, beta, warmup, lr, batch, seconds, gen):
    """Learn V for one layer; returns (iterations run, loss before, loss after) and sets the weight."""
    w = raw_weight(layer).detach()
    soft = _Soft(wq, w)
    opt = torch.optim.Adam([soft.v], lr=lr)
    n = len(xs)
    ch = -1 if isinstance(layer, nn.Linear) else 1

    def rec(idx):
        return sum(_loss(layer(xs[i]), ys[i], weight, ch) for i in idx) / len(idx)

    with torch.no_grad():
        before = float(rec(range(n)))            # rounding to nearest
    object.__setattr__(wq, "forward", soft)    # instance attribute (not a submodule): the chain calls it
    try:
        t0, plan = time.perf_counter(), iters
        for it in range(iters):
            if it == 3 and seconds is not None:            # fit the iterations into this layer's time share
                per = (time.perf_counter() - t0) / 3
                plan = max(4, min(iters, int(seconds / max(per, 1e-9))))
            if it >= plan:
                break
            idx = torch.randint(0, n, (1,), generator=gen).tolist()
            b = beta_at(it, plan, warmup, beta)
            loss = rec(idx)
            if b is not None:
                loss = loss + lam * round_regularizer(rectified_sigmoid(soft.v), b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        ran = min(it + 1, plan)
    finally:
        del wq.forward
    with torch.no_grad():
        w_before = raw_weight(layer).clone()
        raw_weight(layer).copy_(soft.hard())
        after = float(rec(range(n)))
        if after > before:                     # too few iterations to beat nearest: keep nearest
            raw_weight(layer).copy_(w_before)
            after = before
    return ran, before, after


def adaround_(model: nn.Module, data: Iterable, *, iters: int = 500, time_budget_s: float | None = None,
              lam: float = 0.01, beta: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2, lr: float = 1e-2,
              batch: int = 4, max_bits: int = 8, seed: int = 0, progress: Callable | None = None) -> AdaRoundResult:
    """Learn the rounding of every calibrated weight quantizer with at most ``max_bits`` bits,
    layer by layer in forward order, on ``data`` (a list or loader of batches: x or (x, y)).
    ``iters`` per layer, each on ``batch`` calibration samples; ``time_budget_s`` caps the total
    (capture passes included, shared evenly among the layers still to do; layers reached after it is
    spent keep rounding to nearest and are listed in ``skipped``). Run after ``calibrate``; returns a report.
    Under torch.distributed rank 0 learns the rounding on its data and every rank receives the result
    (weights, biases and the recorded bias correction)."""
    from .. import distributed as D
    kw = dict(iters=iters, time_budget_s=time_budget_s, lam=lam, beta=beta, warmup=warmup, lr=lr, batch=batch,
              max_bits=max_bits, seed=seed, progress=progress)
    if not D.active():
        return _adaround(model, data, **kw)
    return once_on_rank0(model, lambda: _adaround(model, data, **kw))


def once_on_rank0(model: nn.Module, fn: Callable):
    """Under torch.distributed: ``fn()`` runs on rank 0 only; every rank gets its return value, the
    model's parameters and buffers, and the recorded bias corrections (rounding verbs)."""
    from .. import distributed as D
    from .bias_correction import CORRECTION_ATTR
    result = D.once_and_broadcast(fn)
    mods = dict(model.named_modules())
    biases = D.broadcast_object({n: tuple(m.bias.shape) for n, m in mods.items()     # rank 0 may have added some
                                 if isinstance(getattr(m, "bias", None), torch.Tensor)})
    for n, shape in biases.items():
        if getattr(mods[n], "bias", None) is None:
            w = mods[n].weight
            mods[n].bias = nn.Parameter(torch.zeros(shape, dtype=w.dtype, device=w.device))
    D.broadcast_module_(model)
    corr = D.broadcast_object({n: getattr(m, CORRECTION_ATTR, None) for n, m in mods.items()})
    for n, m in mods.items():
        if corr.get(n) is not None:
            setattr(m, CORRECTION_ATTR, corr[n])
        elif hasattr(m, CORRECTION_ATTR):      # rank 0 took it out
            delattr(m, CORRECTION_ATTR)
    return result


def _adaround(model: nn.Module, data: Iterable, *, iters, time_budget_s, lam, beta, warmup, lr, batch, max_bits,
              seed, progress) -> AdaRoundResult:
    if iters < 1 or batch < 1 or lam < 0 or not 0 <= warmup < 1:
        raise ConfigError(f"adaround_: iters={iters}, batch={batch}, lam={lam}, warmup={warmup}: expected "
                          "iters >= 1, batch >= 1, lam >= 0, 0 <= warmup < 1")
    batches = _batches(data)
    result = AdaRoundResult()
    todo = {}
    for name, m, wq, aq in quantized_layers(model):
        if wq is None or isinstance(m, nn.Embedding):
            continue
        if not wq.initialized or (aq is not None and not aq.initialized):
            raise ConfigError(f"adaround_: the quantizers of {name!r} are not calibrated; run "
                              "slimtorch.calibrate first")
        if wq.bits > max_bits:
            result.skipped[name] = f"{wq.bits} bits > max_bits={max_bits}"
        elif weight_transforms(m)[0] is not wq:
            result.skipped[name] = "another weight transform runs before its quantizer"
        else:
            todo[name] = (m, wq)
    order = _forward_order(model, todo, batches[0])
    for name in todo:
        if name not in order:
            result.skipped[name] = "not run by the forward pass"
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    corrected = undo_bias_correction_(model)   # the float reference and the targets without it
    gen = torch.Generator().manual_seed(seed)
    ref = _float_copy(model)
    ref_layers = dict(ref.named_modules())
    bn_w = _bn_weights(ref, batches[0])
    try:
        for i, name in enumerate(order):
            layer, wq = todo[name]
            share = None
            if time_budget_s is not None:
                left = time_budget_s - (time.perf_counter() - start)
                if left <= 0:                  # the budget covers capture passes too: stop here
                    result.skipped.update({n: "time budget spent: rounds to nearest" for n in order[i:]})
                    break
                share = left / (len(order) - i) / 2      # about half of a layer's time is capture
            xs = _samples(_capture(model, layer, batches, output=False), batch)
            ys = _samples(_capture(ref, ref_layers[name], batches, output=True), batch)
            with _input_quantized_once(layer, xs) as xs, torch.enable_grad():
                result.layers[name] = _optimise(layer, wq, xs, ys, bn_w.get(name), iters, lam, beta, warmup,
                                                lr, batch, share, gen)
            if progress is not None:
                progress(name, result.layers[name])
        if corrected:                          # the rounding changed: measure the shift again
            bias_correct_(model, batches)
    finally:
        model.train(was_training)
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def _forward_order(model: nn.Module, layers: dict, example) -> list[str]:
    """Names of ``layers`` in the order one forward pass first runs them."""
    order: list[str] = []
    names = {id(m): n for n, (m, _) in layers.items()}
    hooks = [m.register_forward_pre_hook(lambda mod, _a: order.append(names[id(mod)])
                                         if names[id(mod)] not in order else None)
             for m, _ in layers.values()]
    was = model.training
    model.eval()
    try:
        run_batch(model, example, next(model.parameters()).device)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return order
