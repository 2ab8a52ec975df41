"""Error-compensating rounding of the weights after calibration, one layer at a time (GPTQ: Frantar
et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
Alg. 1; the Optimal Brain Quantizer step of Frantar & Alistarh 2022 applied column by column).

For a layer with weight W (rows: output channels; columns: the d = in_channels/groups * kernel
inputs of one group) and X the matrix of its input columns (im2col for a conv, read off the layer's
own forward), the quantized Q minimises ||W X - Q X||^2. With H = X X^T, GPTQ rounds column j to
its row's grid and spreads the error over the columns not yet rounded (OBQ Eq. 3):

    W[:, j+1:] -= (w_j - q_j) / U_jj * U_j,j+1:        U: upper Cholesky factor of H^-1 (GPTQ Sec. 3)

Columns run in order of decreasing H_jj ("act order"), with lazy block updates; H is damped by
``damp`` times its mean diagonal. Grouped and depthwise convs get one H per group. X is the layer's
input in the model whose earlier layers are already rounded, after its own input quantizer
(``asymmetric=True`` rounds instead the least-squares weight W (X_fp X_q^T) H^-1 for the float
model's output W X_fp, as AdaRound's asymmetric reconstruction, Nagel et al. 2020 Eq. 25).

Rows are independent, so per output row 2-fold cross-validation on the calibration samples picks
the damping, a multiplier of the row's step (per-channel quantizers; the quantizer's step is updated)
and GPTQ or plain nearest rounding, whichever reconstructs the held-out half better (a 1x1 conv late
in a CNN has d ~ 1000 inputs and few positions: H is then poorly estimated and plain GPTQ overfits).
The mean output error left, W E[x_fp] - Q E[x_q], moves into the bias (bias correction, Nagel et al.
2019, on the layer's real input columns). The stored weight becomes the rounded value s * q, so the
quantizer reproduces it exactly and QAT, packed export and ONNX see it. A bias correction
``calibrate`` applied is taken out first; layers left to nearest are corrected again at the end."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..attach import bias_transforms, weight_transforms
from ..errors import ConfigError
from .adaround import _Stop, _batches, _float_copy, _forward_order, once_on_rank0
from .batches import run_batch
from .api import quantized_layers
from .bias_correction import bias_correct_, undo_bias_correction_
from .gptq_solver import CONV, _round_layer
from .quantizer import LSQQuantizer


@dataclass
class GPTQResult:
    """Per layer: relative output error ||W X_fp - Q X_q||^2 / ||W X_fp||^2 on the calibration data
    with rounding to nearest and with the kept rounding; skipped layers with the reason."""
    layers: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self):
        lines = [f"GPTQ rounding: {len(self.layers)} layers in {self.seconds:.1f} s"]
        lines += [f"  {n}: relative output error {a:.4g} -> {b:.4g}" for n, (a, b) in self.layers.items()]
        lines += [f"  skipped {n}: {why}" for n, why in self.skipped.items()]
        return "\n".join(lines)


def _stages(order: list, passes: int | None) -> list[list]:
    """``order`` cut into ``passes`` consecutive stages (None: one layer per stage)."""
    if not order:
        return []
    n = len(order) if passes is None else max(1, min(passes, len(order)))
    bounds = [round(i * len(order) / n) for i in range(n + 1)]
    return [order[bounds[i]:bounds[i + 1]] for i in range(n)]


@torch.no_grad()
def _capture_many(model: nn.Module, layers: list, batches: list) -> list[list[torch.Tensor]]:
    """Per layer, its input (before its input quantizer) on every batch: one forward per batch that
    stops once every layer has run (a layer run several times per pass keeps its first call)."""
    got: list[list] = [[] for _ in layers]
    seen: set = set()

    def hook_for(i):
        def pre(_m, args):
            if i not in seen:
                seen.add(i)
                got[i].append(args[0].detach())
                if len(seen) == len(layers):
                    raise _Stop
        return pre
    hooks = [m.register_forward_pre_hook(hook_for(i), prepend=True) for i, m in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for x in batches:
            seen.clear()
            try:
                run_batch(model, x, device)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    return got


def gptq_(model: nn.Module, data: Iterable, *, damp=(0.01, 0.1, 1.0), asymmetric: bool = False,
          act_order: bool = True, scales=(0.8, 0.9, 1.1), passes: int | None = None, max_bits: int = 8,
          bias_correction: bool | None = None, progress: Callable | None = None) -> GPTQResult:
    """Round every calibrated weight quantizer with at most ``max_bits`` bits by GPTQ on ``data`` (a
    list or loader of batches: x or (x, y)), in forward order, in ``passes`` stages (one capture pass
    each; None: one per layer, each layer then sees every earlier one rounded). ``damp`` and
    ``scales`` (multipliers of a per-channel step) are the candidates cross-validation picks from.
    ``bias_correction``: None (default) moves each rounded layer's mean output error into its bias and
    bias-corrects the layers left to nearest if ``calibrate`` had; True does both; False neither. Run after ``calibrate`` (``calibrate`` itself runs it at <= 4 weight bits);
    returns a report. Embeddings are left alone (rows are looked up, not multiplied). Under
    torch.distributed rank 0 rounds on its data and every rank receives the result."""
    from .. import distributed as D
    damps = (damp,) if isinstance(damp, (int, float)) else tuple(damp)
    if not damps or any(isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d < 1e3 for d in damps):
        raise ConfigError(f"gptq_: damp={damp!r}; expected a damping > 0 (times H's mean diagonal) or a "
                          "tuple of them to choose from by cross-validation")
    if any(isinstance(k, bool) or not isinstance(k, (int, float)) or k <= 0 for k in scales):
        raise ConfigError(f"gptq_: scales={scales!r}; expected step multipliers > 0")
    if passes is not None and (isinstance(passes, bool) or not isinstance(passes, int) or passes < 1):
        raise ConfigError(f"gptq_: passes={passes!r}; expected a number of passes >= 1, or None")
    batches = _batches(data)
    result, todo = _select(model, max_bits)
    kw = dict(damps=damps, asymmetric=asymmetric, act_order=act_order, scales=tuple(scales), passes=passes,
              bias_correction=bias_correction, progress=progress)
    if not D.active():
        return _gptq(model, batches, result, todo, **kw)
    return once_on_rank0(model, lambda: _gptq(model, batches, result, todo, **kw))


def _snapshot(model: nn.Module) -> tuple:
    """(parameter and buffer values, which modules have a bias, the recorded bias corrections)."""
    from .bias_correction import CORRECTION_ATTR
    mods = dict(model.named_modules())
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n for n, m in mods.items() if getattr(m, "bias", None) is not None},
            {n: getattr(m, CORRECTION_ATTR) for n, m in mods.items() if hasattr(m, CORRECTION_ATTR)})


@torch.no_grad()
def _restore(model: nn.Module, saved: tuple) -> None:
    from .bias_correction import CORRECTION_ATTR
    state, biased, corr = saved
    for n, m in model.named_modules():
        if n not in biased and isinstance(getattr(m, "bias", None), nn.Parameter) and not bias_transforms(m):
            m.bias = None                     # a bias this pass created
        if hasattr(m, CORRECTION_ATTR):
            delattr(m, CORRECTION_ATTR)
        if n in corr:
            setattr(m, CORRECTION_ATTR, corr[n])
    model.load_state_dict(state)


def _select(model, max_bits):
    """(a result listing the layers left out and why, {name: (layer, weight quantizer)} to round)."""
    result, todo = GPTQResult(), {}
    for name, m, wq, aq in quantized_layers(model):
        if wq is None or isinstance(m, nn.Embedding):
            continue
        if not wq.initialized or (aq is not None and not aq.initialized):
            raise ConfigError(f"gptq_: the quantizers of {name!r} are not calibrated; run slimtorch.calibrate first")
        if not isinstance(wq, LSQQuantizer):
            result.skipped[name] = f"{type(wq).__name__}: GPTQ rounds on a fixed step grid (LSQ / LSQ+ quantizers)"
        elif wq.bits > max_bits:
            result.skipped[name] = f"{wq.bits} bits > max_bits={max_bits}"
        elif weight_transforms(m)[0] is not wq:
            result.skipped[name] = "another weight transform runs before its quantizer"
        elif bias_transforms(m):
            result.skipped[name] = "its bias has a transform"
        elif not isinstance(m, CONV + (nn.Linear,)):
            result.skipped[name] = f"{type(m).__name__} is not a Linear or convolution"
        else:
            todo[name] = (m, wq)
    return result, todo


def _gptq(model, batches, result, todo, *, damps, asymmetric, act_order, scales, passes, bias_correction,
          progress) -> GPTQResult:
    order = _forward_order(model, todo, batches[0])
    result.skipped.update({n: "not run by the forward pass" for n in todo if n not in order})
    was_training = model.training
    start = time.perf_counter()
    saved = _snapshot(model)                   # a failure part-way leaves the model as it was
    try:
        model.eval()
        corrected = undo_bias_correction_(model)   # rounded layers get their output shift from this pass
        ref = _float_copy(model) if asymmetric else None
        ref_layers = dict(ref.named_modules()) if asymmetric else {}
        for stage in _stages([n for n in order], passes):
            xqs = _capture_many(model, [todo[n][0] for n in stage], batches)
            xfs = _capture_many(ref, [ref_layers[n] for n in stage], batches) if asymmetric else [None] * len(stage)
            for name, xq, xf in zip(stage, xqs, xfs):
                layer, wq = todo[name]
                aq = layer._modules.get("input_quantizer")
                with torch.no_grad():
                    xq = [aq(x) for x in xq] if aq is not None else xq
                result.layers[name] = _round_layer(layer, wq, xq, xf, damps, act_order, scales,
                                                   shift_bias=bias_correction is not False)
                if progress is not None:
                    progress(name, result.layers[name])
        if bias_correction or (bias_correction is None and corrected):   # layers left at nearest
            bias_correct_(model, batches)
    except BaseException:
        _restore(model, saved)
        raise
    finally:
        model.train(was_training)
    result.seconds = time.perf_counter() - start
    return result
