"""Range initialisers for learned step sizes (all return tensors shaped like the quantizer's scale).

- ``lsq_init``:       s = 2 <|v|> / sqrt(Q_P)                      (LSQ, Esser et al. 2020, Sec. 2.1)
- ``three_sigma_init``: s = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)   (LSQ+, Bhalgat et al., Sec. 3.3)
- ``minmax_init``:    the range [min, max] mapped onto the levels
- ``mse_init``:       (s, beta) = argmin ||x - x_hat(s, beta)||^2      (LSQ+ Sec. 3.3), solved by a grid
                      search over clipping ranges followed by a few gradient steps through the same
                      fake-quant core the training uses (the paper optimises it with autograd).
"""
from __future__ import annotations

import torch

from .fake_quant import fake_quant

EPS = 1e-8


def _per_channel(x: torch.Tensor, scale_shape) -> torch.Tensor:
    """View x as (channels, -1) following the broadcast shape of the scale (per-tensor -> (1, -1))."""
    if all(d == 1 for d in scale_shape):
        return x.reshape(1, -1)
    axis = [i for i, d in enumerate(scale_shape) if d != 1][0]
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def lsq_init(x, q_p, scale_shape) -> torch.Tensor:
    v = _per_channel(x.detach().float(), scale_shape)
    s = 2 * v.abs().mean(dim=1) / (q_p**0.5)
    return s.clamp_min(EPS).reshape(scale_shape)


def three_sigma_init(x, bits, scale_shape) -> torch.Tensor:
    v = _per_channel(x.detach().float(), scale_shape)
    mu, sigma = v.mean(dim=1), v.std(dim=1, unbiased=False)
    s = torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs()) / 2 ** (bits - 1)
    return s.clamp_min(EPS).reshape(scale_shape)


def minmax_init(x, q_n, q_p, scale_shape, with_offset: bool):
    v = _per_channel(x.detach().float(), scale_shape)
    lo, hi = v.min(dim=1).values, v.max(dim=1).values
    if with_offset:
        s = (hi - lo) / (q_p - q_n)
        return s.clamp_min(EPS).reshape(scale_shape), (lo - q_n * s).reshape(scale_shape)
    amax = torch.maximum(lo.abs(), hi.abs()) if q_n < 0 else hi.clamp_min(0)
    return (amax / q_p).clamp_min(EPS).reshape(scale_shape), None


def _mse(x, s, b, q_n, q_p):
    """Mean squared quantization error of each row: x (C, N), s/b (C,) -> (C,)."""
    s = s[:, None]
    u = (x - b[:, None]).div_(s) if b is not None else x / s
    xh = u.round_().clamp_(q_n, q_p).mul_(s)                  # in place: one temporary, not six
    if b is not None:
        xh.add_(b[:, None])
    return xh.sub_(x).square_().mean(dim=1)


@torch.no_grad()
def _grid(x, q_n, q_p, with_offset, steps, chunk_values=1 << 24):
    """Best clipping range of each row of x (C, N) on a grid of candidates: (s, b, err), each (C,).
    Rows are searched in chunks of at most ``chunk_values`` values (bounded temporaries).
    Symmetric: ``steps`` coarse clipping ratios, then ``steps`` around the best of each row."""
    rows = max(1, chunk_values // max(x.shape[1], 1))
    parts = [_grid_rows(x[i:i + rows], q_n, q_p, with_offset, steps) for i in range(0, x.shape[0], rows)]
    cat = lambda j: None if parts[0][j] is None else torch.cat([p[j] for p in parts])   # noqa: E731
    return cat(0), cat(1), cat(2)


def _best(x, s, b, q_n, q_p):
    """The candidate (rows of s / b, shape (K, C)) with the least error for each row of x."""
    errs = torch.stack([_mse(x, s[k], None if b is None else b[k], q_n, q_p) for k in range(s.shape[0])])
    k = errs.argmin(dim=0, keepdim=True)
    pick = lambda t: t.gather(0, k)[0]                                    # noqa: E731
    return pick(s), (None if b is None else pick(b)), pick(errs)


def _grid_rows(x, q_n, q_p, with_offset, steps):
    lo, hi = x.min(dim=1).values, x.max(dim=1).values
    if with_offset:
        fr = torch.linspace(0.0, 0.6, steps, dtype=x.dtype, device=x.device)
        a, c = (t.reshape(-1, 1) for t in torch.meshgrid(fr, fr, indexing="ij"))
        span = (hi - lo).clamp_min(EPS)
        los, his = lo + a * span, hi - c * span                      # (K, C)
        s = ((his - los) / (q_p - q_n)).clamp_min(EPS)
        return _best(x, s, los - q_n * s, q_n, q_p)
    amax = torch.maximum(lo.abs(), hi.abs()) if q_n < 0 else hi.clamp_min(EPS)
    # coarse: clip to (1 - f) amax for ``steps`` values of f in [0, 0.95]; then ``steps`` around the best
    coarse = torch.linspace(0.0, 0.95, steps, dtype=x.dtype, device=x.device)
    s, _, _ = _best(x, (amax * (1 - coarse[:, None]) / q_p).clamp_min(EPS), None, q_n, q_p)
    gap = float(coarse[1] - coarse[0])
    for _ in range(FINE_LEVELS):       # each level: ``steps`` ratios within one gap of the best so far
        keep = (s * q_p / amax.clamp_min(EPS))[None]                      # best kept fraction 1 - f
        delta = torch.linspace(-gap, gap, steps, dtype=x.dtype, device=x.device)[:, None]
        cand = torch.cat([s[None], amax[None] * (keep + delta).clamp(0.01, 1.0) / q_p])
        s, _, err = _best(x, cand.clamp_min(EPS), None, q_n, q_p)
        gap *= 2 / (steps - 1)
    return s, None, err


FINE_LEVELS = 2              # symmetric grid: refinement levels after the coarse one
REFINE_MAX_VALUES = 1 << 16  # symmetric: Adam refinement only up to this many values (small channels
                             # have a jagged error curve that Adam improves; big ones cost seconds)


def mse_init(x: torch.Tensor, q_n, q_p, with_offset: bool, *, scale_shape=None, max_samples=1 << 15,
             grid_steps=16, refine_steps=60, seed=0):
    """Minimise ||x - x_hat(s, beta)||^2 over (s, beta) (beta only with_offset), per tensor or, with
    ``scale_shape`` (a per-channel quantizer's scale shape), per channel, each channel on its own.

    Symmetric (no offset): a coarse-to-fine grid over the clipping ratio (3 levels, the last one
    0.1% of the range apart), refined by Adam only for small tensors. With offset: a grid over
    (lo, hi), then Adam on s/s0 and
    (beta - beta0)/s0 (lr 0.01: steps of 1% of each channel's own scale), keeping each channel's best. Returns (s, beta, mse): 0-dim
    tensors without ``scale_shape``, else shaped like it (beta None without offset)."""
    v = _per_channel(x.detach().float(), scale_shape or (1,))
    keep = max(max_samples // v.shape[0], min(v.shape[1], 4096))
    if v.shape[1] > keep:                                                  # subsample columns
        g = torch.Generator(device="cpu").manual_seed(seed)
        v = v[:, torch.randperm(v.shape[1], generator=g)[:keep].to(v.device)]
    s0, b0, err0 = _grid(v, q_n, q_p, with_offset, grid_steps)
    if not with_offset and v.numel() > REFINE_MAX_VALUES:   # Adam costs ~20 grid levels: large
        return _shaped(s0, None, err0, scale_shape)          # tensors keep the 3-level grid's best
    best = [s0, b0, err0]
    u = torch.ones_like(s0, requires_grad=True)
    w = torch.zeros_like(s0, requires_grad=True) if b0 is not None else None
    # eps scaled by s0: for one row exactly Adam on (s, beta) with lr 0.01 * s0 and eps 1e-8
    opt = torch.optim.Adam([p for p in (u, w) if p is not None], lr=0.01, eps=1e-8 * float(s0.mean()))

    def error():
        s = (s0 * u).clamp_min(EPS)
        b = None if w is None else b0 + s0 * w
        xh = fake_quant(v, s[:, None], q_n, q_p, None if b is None else b[:, None])
        return s, b, (xh - v).pow(2).mean(dim=1)

    def keep_better(s, b, err):
        better = err.detach() < best[2]
        best[0] = torch.where(better, s.detach(), best[0])
        best[1] = None if b is None else torch.where(better, b.detach(), best[1])
        best[2] = torch.where(better, err.detach(), best[2])
    for _ in range(refine_steps):
        with torch.enable_grad():
            s, b, err = error()
            opt.zero_grad()
            err.sum().backward()                     # rows are independent: each gets its own gradient
        keep_better(s, b, err)
        opt.step()
    with torch.no_grad():
        keep_better(*error())
    return _shaped(*best, scale_shape)


def _shaped(s, b, err, scale_shape):
    """(s, beta, err) of the rows as 0-dim tensors (per tensor) or shaped like ``scale_shape``."""
    if scale_shape is None:
        return s[0], (None if b is None else b[0]), err[0]
    shape = lambda t: None if t is None else t.reshape(scale_shape)      # noqa: E731
    return shape(s), shape(b), shape(err)
