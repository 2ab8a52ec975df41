"""Exact allocation over a bit grid: the Pareto frontier (sum cost, sum Omega) built layer by layer
(a DP whose states are the Pareto set of the prefix; exact for integer costs), the best point under
a budget, and NNCF's / HAWQ's monotone heuristic for comparison. Used by ``hawq.hawq_search``."""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

@dataclass
class Frontier:
    costs: np.ndarray      # int64, ascending
    omegas: np.ndarray     # float64, strictly descending
    choices: np.ndarray    # (points, layers) option indices
    exact: bool = True


def pareto_front(costs, omegas, max_points: int = 200_000) -> Frontier:
    """All Pareto-optimal (sum cost, sum Omega) plans over the grid, exact for integer costs: a DP
    over layers whose state set is the Pareto set of the prefix (dominated partial plans can never
    complete to an optimum). If the set exceeds ``max_points`` it is thinned to the best point per
    cost bucket (then ``exact`` is False and a warning is given)."""
    fc, fo, parents, exact = np.zeros(1, np.int64), np.zeros(1), [], True
    for c, o in zip(costs, omegas):
        c, o = np.asarray(c, np.int64), np.asarray(o, np.float64)
        nc, no = (fc[:, None] + c[None, :]).ravel(), (fo[:, None] + o[None, :]).ravel()
        order = np.lexsort((no, nc))
        nc, no = nc[order], no[order]
        keep = np.ones(len(nc), bool)
        keep[1:] = no[1:] < np.minimum.accumulate(no)[:-1]
        idx, fc, fo = order[keep], nc[keep], no[keep]
        if len(fc) > max_points:
            bucket = np.floor((fc - fc[0]) / max(float(fc[-1] - fc[0]), 1.0) * (max_points - 1))
            last = np.r_[bucket[1:] != bucket[:-1], True]
            idx, fc, fo, exact = idx[last], fc[last], fo[last], False
        parents.append((idx, len(c)))
    choices = np.zeros((len(fc), len(parents)), np.int64)
    p = np.arange(len(fc))
    for layer in range(len(parents) - 1, -1, -1):
        idx, k = parents[layer]
        choices[:, layer], p = idx[p] % k, idx[p] // k
    if not exact:
        warnings.warn(f"Pareto set exceeded max_front={max_points}: thinned, optimum not guaranteed")
    return Frontier(fc, fo, choices, exact)


def best_under(front: Frontier, limit: int) -> int | None:
    """Index of the least-Omega frontier point with cost <= limit (None if infeasible)."""
    i = int(np.searchsorted(front.costs, limit, side="right")) - 1
    return i if i >= 0 else None


def monotone_allocate(order, costs, omegas, limit, max_sequences=100_000):
    """NNCF/HAWQ heuristic: layers sorted by trace (``order``), only bit sequences non-decreasing
    along that order. Returns (option index per layer, cost, Omega) or None when none fits."""
    free = [i for i in order if len(costs[i]) > 1]
    k = max((len(costs[i]) for i in free), default=1)
    if math.comb(len(free) + k - 1, k - 1) > max_sequences:
        raise ConfigError(f"monotone search: too many sequences for {len(free)} layers")
    fixed = [0] * len(costs)
    best = None
    for seq in itertools.combinations_with_replacement(range(k), len(free)):
        ch = list(fixed)
        for i, s in zip(free, seq):
            ch[i] = min(s, len(costs[i]) - 1)
        c = sum(costs[i][j] for i, j in enumerate(ch))
        if c <= limit:
            o = sum(omegas[i][j] for i, j in enumerate(ch))
            if best is None or o < best[2]:
                best = (ch, c, o)
    return best
