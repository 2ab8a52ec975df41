"""Calibration observers: statistics ACCUMULATED over every calibration batch, turned once at the end
into the step s (and offset beta) of a quantizer's integer grid [q_n, q_p].

- ``minmax``:     running min / max (exact over all batches).
- ``percentile``: the p-th / (100-p)-th percentiles of a streaming histogram (default p = 99.99),
                  as in NVIDIA pytorch-quantization's percentile calibrator.
- ``mse``:        the clipping range that minimises the expected squared quantization error of the
                  accumulated histogram for the given grid (signed, unsigned or with offset), the
                  histogram form of LSQ+'s MSE init (Bhalgat et al. 2020, Sec. 3.3).
- ``entropy``:    the threshold minimising KL(P || Q) between the clipped histogram and its
                  quantized version (Migacz, "8-bit inference with TensorRT", GTC 2017).

The histogram is exact-ish and streaming: ``bins`` bins over [lo, lo + bins * width]; when a batch
falls outside, the range grows by an integer factor of the bin width aligned to old bin edges, so
old counts re-bin exactly (no resampling). ``make_observer(name, **opts)`` builds one by name.
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError

EPS = 1e-8


class MinMaxObserver:
    """Running min and max of everything seen."""

    def __init__(self):
        self.lo = self.hi = None

    @torch.no_grad()
    def update(self, x: torch.Tensor):
        x = x.detach()
        lo, hi = float(x.min()), float(x.max())
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = hi if self.hi is None else max(self.hi, hi)

    @property
    def empty(self) -> bool:
        return self.lo is None

    def clip_range(self, q_n, q_p, with_offset) -> tuple[float, float]:
        return self.lo, self.hi

    def fit(self, q_n: int, q_p: int, with_offset: bool):
        """(s, beta) as floats (beta None without offset) for levels [q_n, q_p]."""
        if self.empty:
            raise ConfigError("observer saw no data")
        return range_to_grid(*self.clip_range(q_n, q_p, with_offset), q_n, q_p, with_offset)


def range_to_grid(lo, hi, q_n, q_p, with_offset):
    """Map a clipping range onto the grid: offset s = (hi-lo)/(q_p-q_n), beta = lo - q_n s;
    signed symmetric s = max|.|/q_p; unsigned s = hi/q_p (as ``minmax_init``)."""
    if with_offset:
        s = max((hi - lo) / (q_p - q_n), EPS)
        return s, lo - q_n * s
    amax = max(abs(lo), abs(hi)) if q_n < 0 else max(hi, 0.0)
    return max(amax / q_p, EPS), None


class HistogramObserver(MinMaxObserver):
    """Exact min/max plus a float64 histogram of ``bins`` bins whose range grows as needed."""

    def __init__(self, bins: int = 2048):
        super().__init__()
        self.bins, self.counts, self.h_lo, self.width = bins, None, None, None

    @torch.no_grad()
    def update(self, x: torch.Tensor):
        x = x.detach().reshape(-1).float()
        if x.numel() == 0:
            return
        super().update(x)
        lo, hi = self.lo, self.hi
        if self.counts is None:
            self.h_lo, self.width = lo, max(hi - lo, EPS * max(1.0, abs(lo))) / self.bins
            self.counts = torch.zeros(self.bins, dtype=torch.float64)
        elif lo < self.h_lo or hi > self.h_lo + self.bins * self.width:
            self._grow(lo, hi)
        top = self.h_lo + self.bins * self.width
        h = torch.histc(x.cpu(), bins=self.bins, min=self.h_lo, max=top)
        self.counts += h.double()

    def _grow(self, lo, hi):
        """New width k*w, new start h_lo - m*w (m, k integers): old bin i lands in (i + m) // k."""
        w = self.width
        hi = max(hi, self.h_lo + self.bins * w)                        # old bins must all fit
        m = max(0, math.ceil((self.h_lo - lo) / w))
        new_lo = self.h_lo - m * w
        k = max(1, math.ceil((hi - new_lo) / (self.bins * w)))
        while new_lo + self.bins * k * w < hi:
            k += 1
        idx = (torch.arange(self.bins) + m) // k
        self.counts = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, idx, self.counts)
        self.h_lo, self.width = new_lo, k * w

    def centres(self) -> torch.Tensor:
        return self.h_lo + self.width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)

    def quantile(self, q: float) -> float:
        """Value below which a fraction q of the data lies (linear inside a bin, clamped to min/max)."""
        c = self.counts.cumsum(0)
        target = q * float(c[-1])
        i = int(torch.searchsorted(c, torch.tensor([target], dtype=torch.float64)).clamp_max(self.bins - 1))
        before = float(c[i - 1]) if i > 0 else 0.0
        frac = (target - before) / max(float(self.counts[i]), EPS)
        v = self.h_lo + self.width * (i + min(max(frac, 0.0), 1.0))
        return min(max(v, self.lo), self.hi)


class PercentileObserver(HistogramObserver):
    """Clip at the (100 - p)-th and p-th percentiles (symmetric grids: the larger magnitude)."""

    def __init__(self, percentile: float = 99.99, bins: int = 2048):
        super().__init__(bins)
        check_percentile(percentile)
        self.percentile = float(percentile)

    def clip_range(self, q_n, q_p, with_offset):
        p = self.percentile / 100.0
        lo = self.lo if p == 1.0 else self.quantile(1.0 - p)
        hi = self.hi if p == 1.0 else self.quantile(p)
        return min(lo, 0.0) if q_n < 0 and not with_offset else lo, hi


class MSEObserver(HistogramObserver):
    """Clipping range minimising sum_i n_i (x_i - Q(x_i))^2 over the histogram (bin centres): each
    end shrunk towards c = 0 (or the nearer end of the data) by a factor f, searched on a geometric
    grid 1 .. 1e-3, by coordinate descent (hi, lo, hi) and a final local linear refinement."""

    def __init__(self, bins: int = 2048, steps: int = 64):
        super().__init__(bins)
        self.steps = steps

    def _error(self, lo, hi, q_n, q_p, with_offset):
        """Expected squared error of K candidate ranges lo, hi (K,) -> (K,)."""
        if with_offset:
            s = ((hi - lo) / (q_p - q_n)).clamp_min(EPS)
            b = lo - q_n * s
        else:
            s, b = (hi / q_p).clamp_min(EPS), torch.zeros_like(hi)
        u = (self._x - b[:, None]) / s[:, None]
        xh = torch.clamp(torch.round(u), q_n, q_p) * s[:, None] + b[:, None]
        return ((xh - self._x) ** 2 * self._n).sum(1)

    def clip_range(self, q_n, q_p, with_offset):
        keep = self.counts > 0
        self._x, self._n = self.centres()[keep][None].float(), self.counts[keep][None].float()
        lo, hi = self.lo, self.hi
        if not with_offset:
            hi = max(abs(lo), abs(hi)) if q_n < 0 else max(hi, EPS)
        c = 0.0 if not with_offset else min(max(0.0, lo), hi)
        coarse = torch.logspace(0, -3, self.steps)
        f = {"lo": 1.0, "hi": 1.0}
        ends = ["hi"] + (["lo", "hi"] if with_offset and lo < c else [])

        def search(end, grid):
            cand = {e: torch.full_like(grid, f[e]) for e in f}
            cand[end] = grid
            lo_c = c + (lo - c) * cand["lo"] if with_offset else -(c + (hi - c) * cand["hi"])
            hi_c = c + (hi - c) * cand["hi"]
            if not with_offset and q_n >= 0:
                lo_c = torch.zeros_like(hi_c)
            k = int(self._error(lo_c, hi_c, q_n, q_p, with_offset).argmin())
            f[end] = float(grid[k])
            return k
        for end in ends:
            search(end, coarse)
        for end in dict.fromkeys(ends):                        # local refinement around the best
            k = int((coarse - f[end]).abs().argmin())
            search(end, torch.linspace(float(coarse[min(k + 1, len(coarse) - 1)]),
                                       float(coarse[max(k - 1, 0)]), 33))
        del self._x, self._n
        hi_r = c + (hi - c) * f["hi"]
        lo_r = (c + (lo - c) * f["lo"]) if with_offset else (-hi_r if q_n < 0 else 0.0)
        return lo_r, hi_r


class EntropyObserver(HistogramObserver):
    """TensorRT's KL calibration on the magnitude histogram |x - c| (c = 0, or the nearer end of the
    data): threshold t minimising KL(P || Q), P the histogram clipped at t (outliers added to the last
    bin), Q its quantization onto the grid's levels on that side, spread back over P's non-zero bins."""

    def __init__(self, bins: int = 2048, stride: int = 16):
        super().__init__(bins)
        self.stride = stride

    def _magnitudes(self, c):
        """Histogram of |x - c| on ``bins`` bins over [0, max|x - c|] (re-binned from the centres)."""
        d = (self.centres() - c).abs()
        top = max(float(d.max()), EPS)
        idx = (d / top * self.bins).long().clamp_max(self.bins - 1)
        return torch.zeros(self.bins, dtype=torch.float64).index_add_(0, idx, self.counts), top / self.bins

    def clip_range(self, q_n, q_p, with_offset):
        lo, hi = self.lo, self.hi
        c = min(max(0.0, lo), hi)
        two_sided = lo < c < hi
        levels = (q_p - q_n + 1) // (2 if two_sided else 1) if with_offset else q_p + 1
        hist, w = self._magnitudes(c)
        t = (kl_threshold(hist, levels, self.stride) + 0.5) * w
        return max(lo, c - t), min(hi, c + t)


def kl_threshold(hist: torch.Tensor, levels: int, stride: int = 1) -> int:
    """Index i (bins [0, i) kept) minimising KL(P || Q), TensorRT style."""
    n = len(hist)
    if n <= levels:
        return n - 1
    def kl(i):
        p = hist[:i].clone()
        p[-1] += hist[i:].sum()
        nz = hist[:i] > 0
        group = torch.arange(i) * levels // i                      # which level each bin merges into
        qsum = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, hist[:i])
        qcnt = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, nz.double())
        q = torch.where(nz, qsum[group] / qcnt[group].clamp_min(1), torch.zeros_like(p))
        ps, qs = p.sum(), q.sum()
        if ps <= 0 or qs <= 0:
            return math.inf
        p, q = p / ps, q / qs
        m = p > 0
        return float((p[m] * torch.log(p[m] / q[m].clamp_min(1e-12))).sum())
    coarse = list(range(levels, n, stride)) + [n]
    best = min(coarse, key=kl)                                     # coarse pass, then every bin near it
    best = min(range(max(levels, best - stride + 1), min(n, best + stride - 1) + 1), key=kl)
    return best - 1


OBSERVERS = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver,
             "entropy": EntropyObserver}


def check_percentile(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100:
        raise ConfigError(f"percentile={p!r}: expected a number in (0, 100]")
    return float(p)


def make_observer(name: str, **opts):
    """Build the observer registered under ``name`` (ConfigError listing the names otherwise)."""
    if name not in OBSERVERS:
        raise ConfigError(f"unknown observer {name!r}; expected one of {sorted(OBSERVERS)}")
    if name != "percentile":
        opts.pop("percentile", None)
    if name == "minmax":
        opts.pop("bins", None)
    return OBSERVERS[name](**opts)
