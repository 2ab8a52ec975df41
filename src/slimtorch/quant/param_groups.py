"""Optimizer parameter groups for learned-bit quantizers (Uhlich et al. 2020, Sec. 4).

The bitwidth b(theta) = ceil(log2(qmax/d + 1) + 1) changes when the *ratio* qmax/d changes by a
factor (x2 per bit), but Adam/AdamW move every parameter by about ``lr`` per step whatever its scale:
at lr = 1e-3 a weight qmax of 0.1 needs ~100 steps to lose one bit, one of 10 ~10,000. The groups
below give each learned quantizer parameter (d, qmax, qmin; b) its own learning rate, ``rel_lr`` times
its current magnitude, so with Adam-style optimizers a step moves it by about ``rel_lr`` of its value:
the bits can move by one in about log(2) / (2 rel_lr) steps (~17 at 0.02), for every layer and data
range. No weight decay on them (AdamW's decoupled decay would shrink d and qmax, i.e. the ranges).
The paper's parametrization and gradients (Eq. 3, 6) are unchanged: only the step size is.
"""
from __future__ import annotations

import math

from torch import nn

from ..errors import ConfigError

DEFAULT_REL_LR = 0.02


def _learned_quantizers(model: nn.Module):
    from .uhlich_params import UhlichBase
    return [m for m in model.modules() if isinstance(m, UhlichBase)]


def quantizer_param_groups(model: nn.Module, lr: float, rel_lr: float = DEFAULT_REL_LR,
                           weight_decay: float | None = None) -> list[dict]:
    """Param groups for ``torch.optim.Adam/AdamW(groups, lr=lr)``: every trainable parameter that is
    not a learned-bit quantizer's at ``lr`` (and ``weight_decay`` when given), then one group per
    learned quantizer parameter at ``rel_lr * max(|value|, range min)`` with no weight decay (a
    ``b`` parameter of U1/U2/P1/P2: ``rel_lr * 8``, bits). Call after ``quantize_`` and ``calibrate``
    (the magnitudes are read now). For SGD the official recipe's lr and gradient clipping apply
    instead (``Uhlich(clip_grads=True)``)."""
    for name, v in (("lr", lr), ("rel_lr", rel_lr)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"quantizer_param_groups: {name}={v!r}; expected a number > 0")
    quant = {}
    for q in _learned_quantizers(model):
        for name, p in q.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in quant:
                lo, hi = q.ranges[name]
                scale = float(hi) if name == "b" else max(abs(float(p.detach())), lo)
                quant[id(p)] = (p, rel_lr * scale)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in quant]
    first = {"params": rest, "lr": lr}
    if weight_decay is not None:
        first["weight_decay"] = weight_decay
    groups = [first] if rest else []
    groups += [{"params": [p], "lr": qlr, "weight_decay": 0.0} for p, qlr in quant.values()]
    if not groups:
        raise ConfigError("quantizer_param_groups: the model has no trainable parameters")
    return groups


__all__ = ["quantizer_param_groups", "DEFAULT_REL_LR"]
