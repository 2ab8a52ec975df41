"""Calibration under torch.distributed: every rank's observations merged before the ranges are set,
so all ranks fit the same steps from the union of their data (slimtorch.distributed's REDUCE rule).

- min-max observers: min of the minima, max of the maxima (exact: equal to one process on all data);
- histogram observers (percentile, mse_hist, entropy): rank 0's grid grown to cover every rank's
  range (aligned to its edges, as ``HistogramObserver._grow``), the other ranks' counts spread onto it
  by overlap (mass kept exactly; within a bin the density is taken as uniform);
- sample-based inits (lsq, 3sigma, mse and Uhlich's observations): the samples of all ranks, in rank
  order.
One ``all_gather_object`` carries every quantizer's state; each rank merges the same list the same way.
"""
from __future__ import annotations

import copy

import torch

from .. import distributed as D
from .observers import HistogramObserver


def _leaves(quantizers) -> list:
    """Quantizers that hold observations (an EBS mixer holds one per candidate)."""
    out = []
    for q in quantizers:
        cands = getattr(q, "candidates", None)
        out.extend(cands if cands is not None else [q])
    return out


def _state(q):
    obs = getattr(q, "_observer", None)
    if obs is not None:
        return ("observer", obs)
    return ("samples", [t.detach().cpu() for t in getattr(q, "_obs", [])])


def spread_counts(src: HistogramObserver, h_lo: float, width: float, bins: int) -> torch.Tensor:
    """``src``'s counts on the grid [h_lo + i * width), by linear interpolation of its cumulative
    counts at the grid's edges (total mass kept when the grid covers ``src``'s range)."""
    e_s = src.h_lo + src.width * torch.arange(src.bins + 1, dtype=torch.float64)
    c_s = torch.cat([torch.zeros(1, dtype=torch.float64), src.counts.cumsum(0)])
    e_t = h_lo + width * torch.arange(bins + 1, dtype=torch.float64)
    idx = torch.searchsorted(e_s, e_t, right=True).clamp(1, src.bins)
    left, right = e_s[idx - 1], e_s[idx]
    frac = ((e_t - left) / (right - left)).clamp(0.0, 1.0)
    cum = c_s[idx - 1] + frac * (c_s[idx] - c_s[idx - 1])
    cum = torch.where(e_t <= e_s[0], torch.zeros_like(cum), cum)
    cum = torch.where(e_t >= e_s[-1], c_s[-1].expand_as(cum), cum)
    return cum.diff()


def merge_observers(observers: list):
    """One observer equivalent to all of ``observers`` (rank order; the first sets the grid)."""
    seen = [o for o in observers if not o.empty]
    if not seen:
        return copy.deepcopy(observers[0])
    out = copy.deepcopy(seen[0])
    lo, hi = min(o.lo for o in seen), max(o.hi for o in seen)
    if isinstance(out, HistogramObserver) and out.counts is not None:
        if lo < out.h_lo or hi > out.h_lo + out.bins * out.width:
            out._grow(lo, hi)
        for o in seen[1:]:
            out.counts += spread_counts(o, out.h_lo, out.width, out.bins)
    out.lo, out.hi = lo, hi
    return out


def sync_observations_(quantizers) -> None:
    """Replace every observing quantizer's observations by the merge over all ranks (no-op in one
    process). Call after the calibration pass and before ``finish_observing``."""
    if not D.active():
        return
    leaves = _leaves(quantizers)
    gathered = D.all_gather_object([_state(q) for q in leaves])
    for i, q in enumerate(leaves):
        kinds = {g[i][0] for g in gathered}
        if kinds == {"observer"}:
            q._observer = merge_observers([g[i][1] for g in gathered])
        else:
            q._obs = [t for g in gathered if g[i][0] == "samples" for t in g[i][1]]
