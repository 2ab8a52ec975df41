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
    ``forward(x)`` = x * M (with the straight-through gradient to the scores where there are any).

    Structured masks (structure.py) have a ``grouping``: importance, scores and the binarizer work on
    groups (``group_mask``) and ``mask_for`` expands the group mask to the weight. Tied masks (heads,
    neurons: one group shared by several layers) list every ``(layer, mask)`` of the tie in
    ``members``; the first of a tie (``tie_first``) holds the scores, the others read them."""

    cost_role = "mask"

    def __init__(self, config: PruneConfig, group: int = 0, grouping=None):
        super().__init__()
        self.config = config
        self.group = group
        self.grouping = grouping
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        first = config.final_value() if config.total_steps == 0 else config.initial_value()
        self.register_buffer("value", torch.tensor(float(first), dtype=torch.float64))
        self.register_buffer("threshold", torch.tensor(math.nan, dtype=torch.float64))
        object.__setattr__(self, "members", [])      # plain list: not submodules (no cycles in the tree)
        object.__setattr__(self, "leader", None)

    @property
    def global_scope(self) -> bool:
        return isinstance(self.config, TopKConfig) and self.config.scope == "global"

    @property
    def tie_first(self) -> bool:
        return self.leader is None

    def importance(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @torch.no_grad()
    def group_mask(self, x: torch.Tensor) -> torch.Tensor:
        """The bool mask of the groups (of the weights when unstructured) for weight ``x`` now."""
        imp = self.importance(x)
        keep, min_keep = float(self.value), self.config.min_keep
        if self.global_scope and not math.isnan(float(self.threshold)):
            if keep >= 1:
                return torch.ones_like(imp, dtype=torch.bool)
            return threshold_mask(imp, float(self.threshold), min_keep)
        return topk_mask(imp, keep, min_keep)

    @torch.no_grad()
    def mask_for(self, x: torch.Tensor) -> torch.Tensor:
        """The bool mask M of weight ``x`` now (no gradient)."""
        g = self.group_mask(x)
        return g if self.grouping is None else self.grouping.expand(g, x.shape)

    def extra_repr(self) -> str:
        s = getattr(self.config, "structure", "unstructured")
        return (f"method={type(self.config).method}, value={float(self.value):.4g}, step={int(self.step)}"
                + ("" if s == "unstructured" else f", structure={s}"))


class MagnitudeMask(Mask):
    """M = TopK(|W|, v): pruned weights get no gradient. Structured: the groups' mean |W| (over
    every tied layer)."""

    def importance(self, x):
        if self.grouping is None:
            return x.detach().abs()
        if self.members:
            from ..attach import transform_input
            total, count = 0, 0
            for m, mk in self.members:
                w = transform_input(m, mk).detach()
                total = total + mk.grouping.reduce(w.abs())
                count += mk.grouping.group_numel(w.shape)
            return total / count
        return self.grouping.reduce(x.detach().abs()) / self.grouping.group_numel(x.shape)

    def forward(self, x):
        return x * self.mask_for(x).to(x.dtype)


class _ScoredMask(Mask):
    """A mask with learned scores S (initialised to 0, ``mask_init`` constant / ``mask_scale`` 0 in
    the reference): one per weight, or one per group (tied masks read their first mask's)."""

    def __init__(self, config, weight: torch.Tensor, group: int = 0, grouping=None, leader=None):
        super().__init__(config, group, grouping)
        if leader is not None:
            object.__setattr__(self, "leader", leader)
            return
        shape = weight.shape if grouping is None else grouping.groups_shape(weight.shape)
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.scores = nn.Parameter(torch.zeros(shape, dtype=dtype, device=weight.device))

    @property
    def score_tensor(self) -> torch.Tensor:
        return self.scores if self.leader is None else self.leader.scores

    def importance(self, x):
        return self.score_tensor.detach()

    def forward(self, x):
        s = self.score_tensor
        hard = straight_through(self.group_mask(x), s)
        return x * (hard if self.grouping is None else self.grouping.expand(hard, x.shape)).to(x.dtype)


class HardMovementMask(_ScoredMask):
    """M = TopK(S, v) per layer, or 1[S > global threshold]; dL/dS = dL/dW' * W."""


class SoftMovementMask(_ScoredMask):
    """M = 1[sigmoid(S) > tau] with at least ``min_kept`` weights; dL/dS = dL/dW' * W."""

    @torch.no_grad()
    def group_mask(self, x):
        return threshold_mask(torch.sigmoid(self.score_tensor.detach()), float(self.value), self.config.min_keep)

    def regularizer(self) -> torch.Tensor:
        """||sigmoid(S)||_1 / numel (the reference's L1 term for this matrix)."""
        s = self.score_tensor
        return torch.sigmoid(s).sum() / s.numel()


MASKS = {Magnitude: MagnitudeMask, HardMovement: HardMovementMask, SoftMovement: SoftMovementMask}


def make_mask(config: PruneConfig, weight: torch.Tensor, group: int = 0, grouping=None,
              leader: Mask | None = None) -> Mask:
    """The mask of ``config`` for ``weight`` (``grouping``: structure.py; ``leader``: the first mask
    of a tie, whose scores this one reads)."""
    cls = next((MASKS[t] for t in type(config).__mro__ if t in MASKS), None)
    if cls is None:
        from ..errors import ConfigError
        raise ConfigError(f"no mask for config type {type(config).__name__}")
    if cls is MagnitudeMask:
        m = cls(config, group, grouping)
        if leader is not None:
            object.__setattr__(m, "leader", leader)
    else:
        m = cls(config, weight, group, grouping, leader)
    return m.to(weight.device)


__all__ = ["Mask", "MagnitudeMask", "HardMovementMask", "SoftMovementMask", "make_mask", "MASKS"]
