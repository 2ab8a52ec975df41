"""Latency percentiles of a callable (wall clock, after warm-up)."""
from __future__ import annotations

import time

import numpy as np


def latency(fn, runs: int = 30, warmup: int = 3, max_seconds: float | None = None) -> dict:
    """Run ``fn()`` ``warmup`` times, then up to ``runs`` times (stopping early after
    ``max_seconds``, at least 3 runs); return p50/p90/p99/mean/min in milliseconds and n."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    for i in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if max_seconds is not None and i >= 2 and time.perf_counter() - start > max_seconds:
            break
    ms = np.array(times) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "min": float(ms.min()),
            "n": len(ms)}
