"""Pruning masks as weight transforms (parametrizations of ``weight``, attach.py): W' = W * M.

A mask sits BEFORE any quantizer in the layer's chain, whichever was attached first, so a pruned and
quantized layer computes W' = Q(W * M): calibration, bias correction and export see the masked
weight (``transform_input``). Compression state lives in parameters and buffers (DDP/checkpoints):
``scores`` (movement), ``step`` (optimizer steps taken), ``value`` (the scheduled kept fraction or
tau) and ``threshold`` (the global top-k threshold; NaN when the scope is per layer).

The masks (Sanh, Wolf & Rush 2020; papers.md Sec. 5a; the reference emmental/modules/masked_nn.py):
    magnitude      M = TopK(|W|, v)                   dL/dW = dL/dW' * M, no extra parameters
    hard movement  M = TopK(S, v)     (straight-through)  dL/dS = dL/dW' * W
    soft movement  M = 1[sigmoid(S) > tau] (straight-through)  dL/dS = dL/dW' * W
Global scope: M = 1[importance > threshold], the threshold over all layers of one ``prune_`` call
(binarize.global_threshold). Every mask keeps at least ``min_kept`` weights (binarize.py)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .binarize import straight_through, threshold_mask, topk_mask
from .configs import HardMovement, Magnitude, PruneConfig, SoftMovement, TopKConfig


class Mask(nn.Module):
    """Base of the pruning masks (``cost_role`` "mask", the cost protocol of slimtorch.cost):
    ``mask_for(x)`` -> bool mask of the weight ``x`` it receives, ``importance(x)``, and
    ``forward(x)`` = x * M (with the straight-through gradient to the scores where there are any)."""

    cost_role = "mask"

    def __init__(self, config: PruneConfig, group: int = 0):
        super().__init__()
        self.config = config
        self.group = group
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        first = config.final_value() if config.total_steps == 0 else config.initial_value()
        self.register_buffer("value", torch.tensor(float(first), dtype=torch.float64))
        self.register_buffer("threshold", torch.tensor(math.nan, dtype=torch.float64))

    @property
    def global_scope(self) -> bool:
        return isinstance(self.config, TopKConfig) and self.config.scope == "global"

    def importance(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @torch.no_grad()
    def mask_for(self, x: torch.Tensor) -> torch.Tensor:
        """The bool mask M of weight ``x`` now (no gradient)."""
        imp = self.importance(x)
        keep, min_keep = float(self.value), self.config.min_keep
        if self.global_scope and not math.isnan(float(self.threshold)):
            if keep >= 1:
                return torch.ones_like(imp, dtype=torch.bool)
            return threshold_mask(imp, float(self.threshold), min_keep)
        return topk_mask(imp, keep, min_keep)

    def extra_repr(self) -> str:
        return f"method={type(self.config).method}, value={float(self.value):.4g}, step={int(self.step)}"


class MagnitudeMask(Mask):
    """M = TopK(|W|, v): pruned weights get no gradient."""

    def importance(self, x):
        return x.detach().abs()

    def forward(self, x):
        return x * self.mask_for(x).to(x.dtype)


class _ScoredMask(Mask):
    """A mask with learned scores S (same shape as the weight, initialised to 0, ``mask_init``
    constant / ``mask_scale`` 0 in the reference)."""

    def __init__(self, config, weight: torch.Tensor, group: int = 0):
        super().__init__(config, group)
        self.scores = nn.Parameter(torch.zeros_like(weight, dtype=weight.dtype if weight.is_floating_point()
                                                    else torch.float32))

    def importance(self, x):
        return self.scores.detach()

    def forward(self, x):
        hard = self.mask_for(x)
        return x * straight_through(hard, self.scores).to(x.dtype)


class HardMovementMask(_ScoredMask):
    """M = TopK(S, v) per layer, or 1[S > global threshold]; dL/dS = dL/dW' * W."""


class SoftMovementMask(_ScoredMask):
    """M = 1[sigmoid(S) > tau] with at least ``min_kept`` weights; dL/dS = dL/dW' * W."""

    @torch.no_grad()
    def mask_for(self, x):
        return threshold_mask(torch.sigmoid(self.scores.detach()), float(self.value), self.config.min_keep)

    def regularizer(self) -> torch.Tensor:
        """||sigmoid(S)||_1 / numel (the reference's L1 term for this matrix)."""
        return torch.sigmoid(self.scores).sum() / self.scores.numel()


MASKS = {Magnitude: MagnitudeMask, HardMovement: HardMovementMask, SoftMovement: SoftMovementMask}


def make_mask(config: PruneConfig, weight: torch.Tensor, group: int = 0) -> Mask:
    cls = next((MASKS[t] for t in type(config).__mro__ if t in MASKS), None)
    if cls is None:
        from ..errors import ConfigError
        raise ConfigError(f"no mask for config type {type(config).__name__}")
    m = cls(config, group) if cls is MagnitudeMask else cls(config, weight, group)
    return m.to(weight.device)


__all__ = ["Mask", "MagnitudeMask", "HardMovementMask", "SoftMovementMask", "make_mask", "MASKS"]
