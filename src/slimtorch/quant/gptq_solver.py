"""The GPTQ solver (quant/gptq.py runs it layer by layer): a layer's input columns and their
moments, column-by-column rounding with error feedback (GPTQ Alg. 1, lazy block updates), and the
cross-validated choice of damping, step multiplier and GPTQ-or-nearest per output row."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..attach import raw_param, raw_weight, transform_input
from ..errors import ConfigError
from .bias_correction import _Swapped

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _groups(layer: nn.Module) -> int:
    return layer.groups if isinstance(layer, CONV) else 1


def columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input columns the layer multiplies its weight with: (groups, d, N). For a conv they are
    read off the layer's own forward with an identity weight (so padding, stride, dilation and
    third-party static padding are the layer's), for a Linear they are the input rows."""
    w = raw_weight(layer)
    g = _groups(layer)
    if not isinstance(layer, CONV):
        return x.reshape(-1, x.shape[-1]).t().unsqueeze(0)
    cin_g, k = w.shape[1], w[0, 0].numel()
    d = cin_g * k
    eye = torch.eye(d, dtype=x.dtype, device=x.device).view(d, cin_g, *w.shape[2:])
    probe = eye.repeat(g, *([1] * (eye.dim() - 1)))               # group j's outputs: its d columns
    cols = type(layer).forward(_Swapped(layer, probe), x)          # (B, g*d, *spatial)
    return cols.reshape(cols.shape[0], g, d, -1).permute(1, 2, 0, 3).reshape(g, d, -1)


class _Moments:
    """Per fold (alternate samples) and group: H = X_q X_q^T, C = X_fp X_q^T (asymmetric), the column
    sums of X_q and X_fp and the number of columns, accumulated in float32 (as GPTQ does)."""

    def __init__(self, layer, xq: list, xf: list | None):
        self.h, self.c, self.sq, self.sf, self.n = [0, 0], [None, None], [0, 0], [0, 0], [0, 0]
        self.ff = 0                            # X_fp X_fp^T over both folds: the error's constant term
        seen = 0                               # samples alternate between the folds across batches
        for i, x in enumerate(xq):
            for k in (0, 1):
                part = x[(k + seen) % 2::2]
                if len(part) == 0:
                    continue
                cq = columns(layer, part).float()
                self.h[k] = self.h[k] + cq @ cq.transpose(1, 2)
                self.sq[k] = self.sq[k] + cq.sum(2)
                self.n[k] += cq.shape[2]
                cf = cq if xf is None else columns(layer, xf[i][(k + seen) % 2::2]).float()
                self.sf[k] = self.sf[k] + cf.sum(2)
                if xf is not None:             # symmetric: X_fp = X_q, the constant term is H itself
                    self.ff = self.ff + cf @ cf.transpose(1, 2)
                    self.c[k] = (0 if self.c[k] is None else self.c[k]) + cf @ cq.transpose(1, 2)
            seen += len(x)
        self.single = self.n[1] == 0           # one sample: it is both folds (no cross-validation)
        if self.single:
            self.h[1], self.c[1], self.sq[1], self.sf[1], self.n[1] = self.h[0], self.c[0], self.sq[0], self.sf[0], 0

    def fold(self, k):
        return self.h[k], self.c[k]

    def total(self):
        if self.single:
            return self.h[0], self.c[0]
        return self.h[0] + self.h[1], None if self.c[0] is None else self.c[0] + self.c[1]

    def means(self):
        n = self.n[0] + self.n[1]
        if self.single:
            return self.sq[0] / n, self.sf[0] / n
        return (self.sq[0] + self.sq[1]) / n, (self.sf[0] + self.sf[1]) / n


def _grid(scale: torch.Tensor, offset, q_n: int, q_p: int):
    """Round to the grid of each row: ``scale``/``offset`` (groups, rows); input (groups, rows) for a
    column or (groups, rows, d) for whole rows."""
    def quant(w):
        s = scale if w.dim() == scale.dim() else scale[..., None]
        o = 0 if offset is None else (offset if w.dim() == offset.dim() else offset[..., None])
        return torch.clamp(torch.round((w - o) / s), q_n, q_p) * s + o
    return quant


def _eye_like(h):
    return torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)


def _mean_diag(h):
    return torch.diagonal(h, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[..., None, None]


def gptq_round(w: torch.Tensor, h: torch.Tensor, quant: Callable, damp=0.01, act_order: bool = True,
               block: int = 64) -> torch.Tensor:
    """GPTQ Alg. 1 with lazy block updates, batched over groups: ``w`` (groups, rows, d), ``h``
    (groups, d, d) = X X^T (2-D inputs: one group); ``quant`` rounds a column (groups, rows), every
    row on its own grid; ``damp`` a float or one per group. Returns the rounded weight, shaped as ``w``."""
    if w.dim() == 2:
        return gptq_round(w[None], h[None], lambda col: quant(col[0])[None], damp, act_order, block)[0]
    w, h = w.clone(), h.clone()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    dead = diag <= 0                                   # inputs that are always zero: weight irrelevant
    h = h + torch.diag_embed(dead.to(h.dtype))
    w = w * (~dead)[:, None, :]
    perm = (torch.argsort(torch.diagonal(h, dim1=-2, dim2=-1), dim=-1, descending=True) if act_order
            else torch.arange(h.shape[-1], device=h.device).expand(h.shape[0], -1))
    w = torch.gather(w, 2, perm[:, None, :].expand_as(w))
    h = torch.gather(torch.gather(h, 1, perm[:, :, None].expand_as(h)), 2, perm[:, None, :].expand_as(h))
    damp = torch.as_tensor(damp, dtype=h.dtype, device=h.device).reshape(-1, 1, 1)
    h = h + damp * _mean_diag(h) * _eye_like(h)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    d = w.shape[2]
    for i1 in range(0, d, block):                      # columns of a block one by one, the rest at once
        i2 = min(i1 + block, d)
        w1, e1, u1 = w[:, :, i1:i2].clone(), torch.zeros_like(w[:, :, i1:i2]), u[:, i1:i2, i1:i2]
        for j in range(i2 - i1):
            q[:, :, i1 + j] = quant(w1[:, :, j])
            e1[:, :, j] = (w1[:, :, j] - q[:, :, i1 + j]) / u1[:, j, j][:, None]
            w1[:, :, j + 1:] -= e1[:, :, j, None] * u1[:, None, j, j + 1:]
        w[:, :, i2:] -= e1 @ u[:, i1:i2, i2:]
    return torch.gather(q, 2, torch.argsort(perm, dim=-1)[:, None, :].expand_as(q))


def _row_errors(w, q, h, c=None):
    """Per row, ||w X_fp - q X_q||^2 up to a constant: q H q^T - 2 w C q^T (C = H: target w X_q)."""
    return ((q @ h) * q).sum(-1) - 2 * ((w @ (h if c is None else c)) * q).sum(-1)


def _fit_all(w, h, c, scale, off, q_n, q_p, keys, damps, act_order):
    """GPTQ rounding for every candidate: per damping (one factorisation of H), the step multipliers
    ``keys`` stacked on the row axis (rows are independent); of ``w`` itself, or with ``c`` of the
    least-squares weight W C (H + damp)^-1. Returns (len(damps) * len(keys), groups, rows, d),
    damping-major."""
    g, r, d = w.shape
    m = len(keys)
    steps = torch.cat([scale * k for k in keys], dim=1)                       # (g, m * rows)
    offs = None if off is None else off.repeat(1, m)
    out = []
    for dmp in damps:
        target = w
        if c is not None:        # SPD: a Cholesky solve (a batched LU solve can deadlock in MKL's nested OpenMP)
            hd = h + max(dmp, 1e-6) * _mean_diag(h) * _eye_like(h)
            target = torch.cholesky_solve((w @ c).transpose(1, 2), torch.linalg.cholesky(hd)).transpose(1, 2)
        q = gptq_round(target.repeat(1, m, 1), h, _grid(steps, offs, q_n, q_p), dmp, act_order)
        out.append(q.view(g, m, r, d).transpose(0, 1))
    return torch.cat(out)


def _round_groups(w, mom: _Moments, grid: tuple, keys: list, damps: tuple, act_order):
    """Round every row with the candidate (step multiplier, damping) that, fitted on one fold,
    reconstructs the other best (2-fold cross-validation, per row: rows are independent), refitted on
    both folds; rounding to nearest on the calibrated grid is a candidate too, so a row where GPTQ does
    not generalise keeps it. Returns (rounded (groups, rows, d), chosen step multiplier per row,
    relative error of nearest, relative error of the kept rounding)."""
    scale, off, q_n, q_p = grid
    (h0, c0), (h1, c1) = mom.fold(0), mom.fold(1)
    h, c = mom.total()
    nearest = _grid(scale, off, q_n, q_p)(w)
    e_near = _row_errors(w, nearest, h1, c1) + _row_errors(w, nearest, h0, c0)
    err = (_row_errors(w, _fit_all(w, h0, c0, *grid, keys, damps, act_order), h1, c1)
           + _row_errors(w, _fit_all(w, h1, c1, *grid, keys, damps, act_order), h0, c0))   # (k, g, rows)
    best_err, best = err.min(0)
    use = best_err < e_near
    q_all = _fit_all(w, h, c, *grid, keys, damps, act_order)
    chosen = torch.gather(q_all, 0, best[None, ..., None].expand(1, *w.shape))[0]
    out = torch.where(use[..., None], chosen, nearest)
    mults = torch.tensor([key for _ in damps for key in keys], dtype=w.dtype, device=w.device)
    mult = torch.where(use, mults[best], torch.ones_like(best_err))
    energy = ((w @ (h if c is None else mom.ff)) * w).sum()                  # ||W X_fp||^2: errors relative to the output
    rel = lambda q: float((_row_errors(w, q, h, c).sum() + energy) / energy.clamp_min(1e-30))
    return out, mult, rel(nearest), rel(out)


@torch.no_grad()
def _round_layer(layer, wq, xq, xf, damps, act_order, scales, shift_bias: bool = True):
    """GPTQ-round one layer's weight in place (per-channel steps: each row may also take its step
    times one of ``scales``) and move the mean output error into its bias (W E[x_fp] - Q E[x_q]);
    returns the relative output errors (nearest, kept rounding)."""
    w0 = transform_input(layer, wq).detach()
    p = wq.quant_params()
    n_out, g = w0.shape[0], _groups(layer)
    per_channel = p["scale"].numel() == n_out and n_out > 1
    if not per_channel and p["scale"].numel() != 1:
        raise ConfigError("gptq_: the weight quantizer is neither per tensor nor per output channel")
    shape = (g, n_out // g)
    scale = p["scale"].float().reshape(-1).expand(n_out).reshape(shape)
    off = None if p["offset"] is None else p["offset"].float().reshape(-1).expand(n_out).reshape(shape)
    keys = sorted(set(scales if per_channel else ()) | {1.0})
    mom = _Moments(layer, xq, xf)
    w = w0.float().reshape(*shape, -1)
    q, key, before, after = _round_groups(w, mom, (scale, off, p["q_n"], p["q_p"]), keys, damps, act_order)
    mq, mf = mom.means()                                            # (groups, d)
    shift = ((w * mf[:, None, :]).sum(-1) - (q * mq[:, None, :]).sum(-1)).reshape(-1)
    raw_weight(layer).copy_(q.reshape(w0.shape).to(w0.dtype))
    if per_channel:
        wq.scale.data.mul_(key.reshape(wq.scale.shape).to(wq.scale.dtype))
    if shift_bias:
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(n_out, dtype=w0.dtype, device=w0.device))
        raw_param(layer, "bias").add_(shift.to(w0.dtype))
    return before, after
