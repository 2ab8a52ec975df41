"""LUT or dense for a product-quantized Linear, chosen by measured speed per shape (``PQLinear``
mode "auto", ``load_packed(..., pq_kernel="auto")``).

Cost model (pq_lut.py): the LUT path does N D K multiply-adds for the table and N out J gather-adds;
the dense path N D out multiply-adds in a tuned GEMM. Which wins depends on out / K, the batch N,
the cache and the BLAS, so it is measured rather than predicted: for one (out, in, d, K) at
``batch`` input rows, both kernels run on random centroids, codes and inputs of that shape (a few
warm-up calls, then the best of ``REPEATS`` alternating calls); LUT is kept only when it is faster
by ``MARGIN`` (dense is bit-identical to the fake-quant layer, so it wins ties). Decisions are cached
per (out, in, d, K, batch, dtype, threads) for the process (``clear_cache`` forgets them)."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .pq_lut import dense_weight, lut_index, lut_matmul

REPEATS = 7
WARMUP = 2
MARGIN = 0.9          # LUT must take < 0.9 x the dense time
_CACHE: dict[tuple, str] = {}


@torch.no_grad()
def time_kernels(out: int, in_features: int, d: int, k: int, batch: int = 1, dtype=torch.float32,
                 repeats: int = REPEATS, seed: int = 0) -> dict:
    """{"lut": s, "dense": s}: the best wall time of each kernel for this shape (random data)."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(k, d, generator=gen).to(dtype)
    codes = torch.randint(0, k, (out, in_features // d), generator=gen)
    x = torch.randn(max(1, batch), in_features, generator=gen).to(dtype)
    idx, w = lut_index(codes, k), dense_weight(c, codes, in_features)
    fns = {"lut": lambda: lut_matmul(x, c, idx), "dense": lambda: F.linear(x, w)}
    for _ in range(WARMUP):
        for f in fns.values():
            f()
    times = {name: float("inf") for name in fns}
    for _ in range(repeats):                  # alternate, so a load spike hits both
        for name, f in fns.items():
            t = time.perf_counter()
            f()
            times[name] = min(times[name], time.perf_counter() - t)
    return times


def pick_kernel(out: int, in_features: int, d: int, k: int, batch: int = 1, dtype=torch.float32) -> str:
    """"lut" or "dense", whichever is measured faster for this shape at ``batch`` rows (cached)."""
    key = (out, in_features, d, k, max(1, batch), str(dtype), torch.get_num_threads())
    if key not in _CACHE:
        t = time_kernels(out, in_features, d, k, batch, dtype)
        _CACHE[key] = "lut" if t["lut"] < MARGIN * t["dense"] else "dense"
    return _CACHE[key]


def cached_choices() -> dict:
    """{(out, in, d, K, batch, dtype, threads): "lut" | "dense"} decided so far in this process."""
    return dict(_CACHE)


def clear_cache() -> None:
    _CACHE.clear()


__all__ = ["pick_kernel", "time_kernels", "cached_choices", "clear_cache", "REPEATS", "MARGIN"]
