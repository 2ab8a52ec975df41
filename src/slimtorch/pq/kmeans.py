"""k-means on weight sub-vectors, the product quantizer's fit (Stock et al. 2020 "And the Bit Goes
Down"; fairseq ``modules/quantization/pq/em.py``; papers.md Sec. 6a "iPQ").

Lloyd's algorithm on n sub-vectors x_i of dimension d with K centroids c_k:
    init     K distinct random rows (``torch.Generator`` seeded: the same result on every rank)
    E-step   a_i = argmin_k ||x_i - c_k||^2 = argmin_k (||c_k||^2 - 2 x_i . c_k), one matmul per
             chunk of rows (``chunk_rows``), so memory stays at chunk x K distances
    M-step   c_k = S_k / n_k with S_k = sum_{a_i = k} x_i (``index_add_``), n_k (``bincount``)
    empty    fairseq: an empty cluster k takes half of the most populated m: c_k = c_m + e,
             c_m -= e, e ~ eps N(0, 1); m's members move to k where (x - c_m) . e > 0 (the exact
             nearer-of-the-two rule), so the split holds even when e is below float resolution
The objective J = sum_i ||x_i - c_{a_i}||^2 after each M-step is sum_i ||x_i||^2 - sum_k
||S_k||^2 / n_k (float64, no extra pass); it never increases (the E- and M-steps each lower it;
a split changes it by at most n_m |e|^2 before its M-step). Stops early when no code changes."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

EPS = 1e-6          # fairseq's split noise
CHUNK_ELEMENTS = 1 << 17    # distances held at once (0.5 + 1 MiB: in cache; fastest measured)
MAX_CENTROIDS = 1 << 16     # codes ride in 16 low bits of the distances (assign)


@dataclass
class KMeansResult:
    centroids: torch.Tensor          # (K, d), the dtype of the data
    codes: torch.Tensor              # (n,), uint8 / int16 / int32 by K
    objective: list = field(default_factory=list)   # J after each iteration (float)
    iterations: int = 0

    @property
    def n_centroids(self) -> int:
        return self.centroids.shape[0]


def code_dtype(k: int) -> torch.dtype:
    """The narrowest integer dtype holding codes 0..k-1: uint8 (k <= 256), int16, int32."""
    return torch.uint8 if k <= 256 else torch.int16 if k <= 1 << 15 else torch.int32


def code_bits(k: int) -> int:
    """Bits of one code when bit-packed: ceil(log2 k), at least 1."""
    return max(1, math.ceil(math.log2(k)))


def chunk_rows(k: int) -> int:
    return max(64, CHUNK_ELEMENTS // max(k, 1))


@torch.no_grad()
def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """E-step: the index (int64) of the nearest centroid of every row of float32 ``x``, chunked over
    rows. Distances up to ||x||^2: ||c||^2 - 2 x c^T (one addmm per chunk). The argmin is one
    ``amin``: each float32 distance widened to float64 (29 low mantissa bits zero, so exact) carries
    its centroid index in its low 16 bits, which keeps the order of distinct distances (2x faster
    than ``argmin`` over the last dimension on CPU)."""
    k = centroids.shape[0]
    c_sq = (centroids * centroids).sum(1)
    ct = centroids.t().contiguous()
    codes = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    step = chunk_rows(k)
    buf = torch.empty(min(step, x.shape[0]), k, dtype=x.dtype, device=x.device)
    wide = torch.empty(buf.shape, dtype=torch.float64, device=x.device)
    tag = torch.arange(k, dtype=torch.int64, device=x.device)
    for s in range(0, x.shape[0], step):
        xs = x[s:s + step]
        r = xs.shape[0]
        d = torch.addmm(c_sq, xs, ct, alpha=-2.0, out=buf[:r])
        w = wide[:r]
        w.copy_(d)
        w.view(torch.int64).bitwise_or_(tag)
        codes[s:s + r] = w.amin(1).view(torch.int64) & 0xFFFF
    return codes


def _split_empty(x, centroids, codes, counts, gen, eps) -> int:
    """Give every empty cluster half of the most populated splittable one (fairseq's rule, the
    members assigned by the sign of (x - c_m) . e); returns how many were filled. A cluster whose
    members are all identical cannot be split: the next most populated one is tried."""
    filled, stuck = 0, set()
    for k in (counts == 0).nonzero().reshape(-1).tolist():
        for m in torch.argsort(counts, descending=True, stable=True).tolist():
            if counts[m] < 2:
                break
            if m in stuck:
                continue
            e = eps * torch.randn(centroids.shape[1], generator=gen).to(centroids)
            members = (codes == m).nonzero().reshape(-1)
            side = ((x[members] - centroids[m]).double() @ e.double()) > 0
            moved = int(side.sum())
            if 0 < moved < members.numel():
                centroids[k] = centroids[m] + e
                centroids[m] -= e
                codes[members[side]] = k
                counts[k], counts[m] = moved, counts[m] - moved
                filled += 1
                break
            stuck.add(m)
    return filled


def kmeans(x: torch.Tensor, k: int, n_iter: int = 20, seed: int = 0, eps: float = EPS,
           what: str = "k-means", init: torch.Tensor | None = None) -> KMeansResult:
    """Fit ``k`` centroids to the rows of ``x`` (n x d) in at most ``n_iter`` Lloyd iterations,
    starting from ``init`` (k x d) or k distinct random rows drawn with ``seed``. More centroids
    than rows: k falls back to n with a warning naming ``what``."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{what}: expected a non-empty (n, d) matrix, got shape {tuple(x.shape)}")
    n, d = x.shape
    if k > n:
        warnings.warn(f"{what}: {k} centroids asked for {n} sub-vectors; using {n} centroids", stacklevel=2)
        k = n
    if k > MAX_CENTROIDS:
        raise ValueError(f"{what}: {k} centroids; at most {MAX_CENTROIDS} are supported")
    out_dtype = x.dtype
    x = x.detach().to(torch.float32).contiguous()
    gen = torch.Generator().manual_seed(int(seed))
    if init is not None:
        if tuple(init.shape) != (k, d):
            raise ValueError(f"{what}: init has shape {tuple(init.shape)}, expected {(k, d)}")
        centroids = init.detach().to(x).clone()
    else:
        centroids = x[torch.randperm(n, generator=gen)[:k].to(x.device)].clone()
    x_sq = float((x.double() ** 2).sum())
    codes, history, it = None, [], 0
    for it in range(1, n_iter + 1):
        new = assign(x, centroids)
        counts = torch.bincount(new, minlength=k)
        if bool((counts == 0).any()):
            _split_empty(x, centroids, new, counts, gen, eps)
        changed = codes is None or not torch.equal(new, codes)
        codes = new
        sums = torch.zeros_like(centroids).index_add_(0, codes, x)
        full = counts > 0
        centroids[full] = sums[full] / counts[full].unsqueeze(1).to(x.dtype)
        s64 = sums.double()
        history.append(x_sq - float(((s64 * s64).sum(1)[full] / counts[full].double()).sum()))
        if not changed:
            break
    if codes is None:                          # n_iter == 0: the initial assignment
        codes = assign(x, centroids)
        history.append(objective(x, centroids, codes))
    return KMeansResult(centroids.to(out_dtype), codes.to(code_dtype(k)), history, it)


def objective(x: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor) -> float:
    """J = sum_i ||x_i - c_{a_i}||^2 computed directly (float64)."""
    return float(((x.double() - centroids.double()[codes.long()]) ** 2).sum())


__all__ = ["kmeans", "assign", "objective", "KMeansResult", "code_dtype", "code_bits", "EPS"]
