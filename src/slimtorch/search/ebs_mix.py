"""EBS's softmax-weighted mixture of quantizations of ONE shared meta tensor (Li et al. 2020, Fig. 1):

    x_hat = sum_{b in B} p_b * Q_b(x),      p = softmax(alpha / T)

``alpha`` is the learnable strength of each candidate bitwidth, ``Q_b`` an LSQ/LSQ+ quantizer with its
own learned step (and offset) per candidate, run through the fake-quant core's arithmetic
(quant/fake_quant.py). Gradients (straight-through inside each candidate's range):

    d x_hat / d x       = sum_b p_b * 1[q_n,b <= u_b <= q_p,b]
    d x_hat / d p_b     = Q_b(x)
    d x_hat / d s_b     = p_b * (round(u_b) - u_b inside, q_n,b below, q_p,b above) * g_b   (LSQ Eq. 3)
    d x_hat / d beta_b  = p_b * (0 inside, 1 outside) * g_b                              (LSQ+ Eq. 5)

Memory: the autograd node keeps only x (the meta tensor itself) and recomputes each candidate's
rounding in the backward pass, so a layer's search state is one copy of the weights plus |B| step
sizes; a DNAS-style search keeps one weight copy (and its optimizer state) per candidate.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..quant.fake_quant import _clamped_u, _wsum
from ..quant.init import EPS


class _MixedFakeQuant(torch.autograd.Function):
    """forward(x, p, bounds, gscales, s_0, beta_0, s_1, beta_1, ...) -> sum_b p_b Q_b(x)."""

    @staticmethod
    def forward(ctx, x, p, bounds, gscales, *params):
        acc = torch.promote_types(x.dtype, params[0].dtype)      # sum in the steps' precision
        out = torch.zeros(x.shape, dtype=acc, device=x.device)
        for b, (q_n, q_p) in enumerate(bounds):
            s, off = params[2 * b], params[2 * b + 1]
            q = torch.round(_clamped_u(x, s, off, q_n, q_p)[1])
            val = torch.addcmul(off, q, s) if off is not None else q * s
            out.addcmul_(val, p[b].to(acc))                      # p stays a tensor: no host sync
        ctx.bounds, ctx.gscales, ctx.has_off = bounds, gscales, [params[2 * b + 1] is not None
                                                                 for b in range(len(bounds))]
        ctx.save_for_backward(x, p, *(t for t in params if t is not None))
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, p, *saved = ctx.saved_tensors
        it = iter(saved)
        gx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        gp = torch.zeros_like(p)
        grads = []
        for b, (q_n, q_p) in enumerate(ctx.bounds):
            s = next(it)
            off = next(it) if ctx.has_off[b] else None
            u, c = _clamped_u(x, s, off, q_n, q_p)
            inside = c == u
            del u
            q = torch.round(c)
            val = torch.addcmul(off, q, s) if off is not None else q * s
            gp[b] = torch.dot(grad_out.reshape(-1).to(val.dtype), val.reshape(-1)).to(gp.dtype)
            del val
            gb = grad_out.to(s.dtype) * p[b].to(s.dtype)
            gin = gb * inside
            if gx is not None:
                gx.add_(gin)
            g = ctx.gscales[b]
            grad_s = (_wsum(gb, q, s) - _wsum(gin, c, s)).to(s.dtype) * g
            grad_off = ((gb - gin).sum_to_size(off.shape) * g).to(off.dtype) if off is not None else None
            grads += [grad_s, grad_off]
        return (gx, gp, None, None, *grads)


def mixed_fake_quant(x, probs, quantizers) -> torch.Tensor:
    """sum_b probs[b] * Q_b(x) over initialised LSQ quantizers, recomputing in the backward pass."""
    bounds, gscales, params = [], [], []
    for q in quantizers:
        n = x.numel() / q.scale.numel()
        if q.role == "activation" and x.dim() > 1:
            n /= x.shape[0]
        gscales.append(1.0 / math.sqrt(max(n, 1.0) * q.q_p) if q.use_grad_scale else 1.0)
        bounds.append((q.q_n, q.q_p))
        params += [q.scale.clamp_min(EPS), q.offset]
    return _MixedFakeQuant.apply(x, probs, tuple(bounds), tuple(gscales), *params)


class BitMixer(nn.Module):
    """The search-time stand-in for one quantizer: candidates ``Q_b`` (one LSQQuantizer per bit in
    ``bits``, built by ``make(b)``) and strengths ``alpha`` (own, or ``shared`` with the layer's other
    mixer when W and A bits are tied). Works as a weight transform and as an input quantizer
    (calibration protocol delegated to the candidates). ``bits`` reads the current argmax."""

    cost_role = "ebs"

    def __init__(self, bits, make, role: str, temperature: float = 1.0, shared: "BitMixer | None" = None):
        super().__init__()
        self.candidate_bits = tuple(bits)
        self.role, self.temperature = role, float(temperature)
        self.candidates = nn.ModuleList(make(b) for b in self.candidate_bits)
        if shared is not None:
            if shared.candidate_bits != self.candidate_bits:
                raise ConfigError("tied W/A strengths need the same candidate bits")
            self.strength = shared.strength
        else:
            self.strength = nn.Parameter(torch.zeros(len(self.candidate_bits)))
        self.observing = False

    def extra_repr(self):
        return f"{self.role}, bits={self.candidate_bits}, T={self.temperature}"

    def probs(self, dtype=None) -> torch.Tensor:
        """p = softmax(alpha / T): the differentiable strength of each candidate (in ``dtype``)."""
        a = self.strength if dtype is None else self.strength.to(dtype)
        return torch.softmax(a / self.temperature, dim=0)

    @property
    def bits(self) -> int:
        """The candidate with the largest strength (the first on a tie)."""
        return self.candidate_bits[int(torch.argmax(self.strength.detach()))]

    @property
    def initialized(self) -> bool:
        return all(q.initialized for q in self.candidates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            for q in self.candidates:
                q(x)                  # observing: records x, returns it unchanged
            return x
        for q in self.candidates:
            if not q.initialized:
                q.initialize(x.detach())
        return mixed_fake_quant(x, self.probs().to(x.dtype), self.candidates)

    # -- calibration protocol (slimtorch.calibrate), delegated to every candidate --
    def start_observing(self):
        self.observing = True
        for q in self.candidates:
            q.start_observing()

    def has_observed(self) -> bool:
        return all(q.has_observed() for q in self.candidates)

    def discard_observations(self):
        self.observing = False
        for q in self.candidates:
            q.discard_observations()

    def finish_observing(self):
        self.observing = False
        for q in self.candidates:
            q.finish_observing()
