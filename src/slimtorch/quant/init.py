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
    """Mean squared quantization error, per candidate: x (N,), s/b (K,1) -> (K,)."""
    u = (x - b) / s if b is not None else x / s
    xh = torch.clamp(torch.round(u), q_n, q_p) * s
    if b is not None:
        xh = xh + b
    return (xh - x).pow(2).mean(dim=1)


@torch.no_grad()
def _grid(x, q_n, q_p, with_offset, steps):
    lo, hi = x.min(), x.max()
    fr = torch.linspace(0.0, 0.6, steps, dtype=x.dtype, device=x.device)
    if with_offset:
        span = (hi - lo).clamp_min(EPS)
        a, c = torch.meshgrid(fr, fr, indexing="ij")
        los, his = lo + a.reshape(-1) * span, hi - c.reshape(-1) * span
        s = ((his - los) / (q_p - q_n)).clamp_min(EPS)
        b = los - q_n * s
        s, b = s[:, None], b[:, None]
    else:
        amax = torch.maximum(lo.abs(), hi.abs()) if q_n < 0 else hi.clamp_min(EPS)
        s = (amax * (1 - torch.linspace(0.0, 0.95, steps * 4, dtype=x.dtype, device=x.device)) / q_p)
        s, b = s.clamp_min(EPS)[:, None], None
    errs = torch.cat([_mse(x, s[i:i + 64], None if b is None else b[i:i + 64], q_n, q_p)
                      for i in range(0, s.shape[0], 64)])
    k = int(errs.argmin())
    return s[k, 0], (None if b is None else b[k, 0]), errs[k]


def mse_init(x: torch.Tensor, q_n, q_p, with_offset: bool, *, max_samples=1 << 15,
             grid_steps=16, refine_steps=60, seed=0):
    """Minimise ||x - x_hat(s, beta)||^2 over a per-tensor (s, beta) (beta only with_offset).

    Returns (s, beta, mse) as 0-dim tensors (beta None without offset)."""
    x = x.detach().float().reshape(-1)
    if x.numel() > max_samples:
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = x[torch.randperm(x.numel(), generator=g)[:max_samples].to(x.device)]
    s0, b0, err0 = _grid(x, q_n, q_p, with_offset, grid_steps)
    best = (s0, b0, err0)
    s = s0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True) if b0 is not None else None
    opt = torch.optim.Adam([p for p in (s, b) if p is not None], lr=float(s0) * 0.01)
    for _ in range(refine_steps):
        with torch.enable_grad():
            err = (fake_quant(x, s.clamp_min(EPS), q_n, q_p, b) - x).pow(2).mean()
            opt.zero_grad()
            err.backward()
        if err.detach() < best[2]:
            best = (s.detach().clamp_min(EPS).clone(), None if b is None else b.detach().clone(), err.detach())
        opt.step()
    with torch.no_grad():
        final = (fake_quant(x, s.clamp_min(EPS), q_n, q_p, b) - x).pow(2).mean()
    if final < best[2]:
        best = (s.detach().clamp_min(EPS).clone(), None if b is None else b.detach().clone(), final)
    return best
