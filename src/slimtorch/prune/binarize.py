"""Binarizers: importance scores -> a {0, 1} mask (the reference's ``TopKBinarizer`` and
``ThresholdBinarizer``, emmental/modules/binarizer.py), plus the straight-through estimator.

Every mask keeps at least ``min_kept(n) = int(min_keep * n) + 1`` of a layer's n weights
(``ThresholdBinarizer``'s floor, 0.5% by default), so that no layer is cut off."""
from __future__ import annotations

import math

import torch


def min_kept(numel: int, min_keep: float = 0.005) -> int:
    """int(min_keep * numel) + 1, at most numel: the fewest weights a layer keeps."""
    return min(int(min_keep * numel) + 1, numel)


def _top(importance: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly the ``k`` largest entries (ties broken by torch.topk's order)."""
    flat = importance.detach().reshape(-1)
    k = max(0, min(int(k), flat.numel()))
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k == flat.numel():
        out.fill_(True)
    elif k > 0:
        out[torch.topk(flat, k, sorted=False).indices] = True
    return out.reshape(importance.shape)


def topk_mask(importance: torch.Tensor, keep: float, min_keep: float = 0.005) -> torch.Tensor:
    """M = TopK(importance, keep): the floor(keep * n) largest entries (at least ``min_kept``), as the
    reference ``TopKBinarizer`` (j = int(keep * n)); ``keep`` >= 1 keeps all."""
    n = importance.numel()
    if keep >= 1:
        return torch.ones_like(importance, dtype=torch.bool)
    k = math.floor(keep * n + 1e-9)       # int(keep * n), robust to 0.1 * 100 = 9.999...
    return _top(importance, max(k, min_kept(n, min_keep)))


def threshold_mask(importance: torch.Tensor, threshold: float, min_keep: float = 0.005) -> torch.Tensor:
    """M = 1[importance > threshold], or the top ``min_kept`` entries when fewer survive (the
    reference ``ThresholdBinarizer``; its kthvalue fallback, with exact ties resolved by top-k)."""
    mask = importance.detach() > threshold
    nb_min = min_kept(importance.numel(), min_keep)
    if int(mask.sum()) < nb_min:
        return _top(importance, nb_min)
    return mask


def global_threshold(importances: list, keep: float) -> float:
    """The reference's global top-k threshold over the concatenation of all layers' importances:
    kth = max(n - (int(n * keep) + 1), 1); threshold = kthvalue(kth), so that about ``keep`` of all
    entries are strictly above it. ``keep`` >= 1: -inf (keep everything; the reference's kthvalue
    would drop the smallest entry and, with the constant initial scores, every entry)."""
    if keep >= 1:
        return float("-inf")
    flat = torch.cat([t.detach().reshape(-1).float() for t in importances])
    n = flat.numel()
    kth = max(n - (math.floor(n * keep + 1e-9) + 1), 1)
    return float(flat.kthvalue(kth).values)


def straight_through(hard: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``hard`` in value, identity gradient to ``scores`` (the binarizers' backward returns
    gradOutput unchanged): W' = W * M gives dL/dS = dL/dW' * W."""
    return hard.to(scores.dtype) + (scores - scores.detach())


__all__ = ["min_kept", "topk_mask", "threshold_mask", "global_threshold", "straight_through"]
