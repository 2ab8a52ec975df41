"""The one fake-quantization core shared by every uniform quantizer in slimtorch.

    u     = (x - beta) / s
    x_bar = clamp(round(u), q_n, q_p)                 (LSQ Eq. 1 / LSQ+ Eq. 2)
    x_hat = x_bar * s + beta

Backward (straight-through estimator, zero outside the range, LSQ Eq. 3-5, LSQ+ Eq. 4-5):

    dx_hat/dx    = 1 if q_n <= u <= q_p else 0
    dx_hat/ds    = round(u) - u inside, q_n below, q_p above          (times grad scale g)
    dx_hat/dbeta = 0 inside, 1 outside                                 (times grad scale g)
    dx_hat/dq_n  = s below the range, 0 elsewhere
    dx_hat/dq_p  = s above the range, 0 elsewhere

The gradients with respect to the level bounds q_n, q_p (when they are tensors that require grad)
let parametrizations such as Uhlich et al.'s (d, q_max) or (b, d) be written as differentiable maps
theta -> (s, q_n, q_p): the chain rule then yields exactly their Eq. 3a-c.
"""
from __future__ import annotations

import torch

Number = float | int


def qrange(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer level range (q_n, q_p) for a b-bit quantizer.

    signed: [-2^(b-1), 2^(b-1)-1] (narrow: [-(2^(b-1)-1), 2^(b-1)-1]); unsigned: [0, 2^b-1].
    """
    if signed:
        qp = 2 ** (bits - 1) - 1
        return (-qp if narrow else -qp - 1), qp
    return 0, 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity in the backward pass."""
    return (x.round() - x).detach() + x


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x in the forward pass, gradient multiplied by g in the backward pass (LSQ Sec. 2.2)."""
    return (x - x * g).detach() + x * g


def _reduce(grad: torch.Tensor, like) -> torch.Tensor | None:
    if not isinstance(like, torch.Tensor) or not like.requires_grad:
        return None
    return grad.sum_to_size(like.shape) if grad.shape != like.shape else grad


def _wsum(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """sum(a * b) reduced to ``like``'s shape; a single dot product when ``like`` has one element."""
    if like.numel() == 1:
        return torch.dot(a.reshape(-1), b.reshape(-1).to(a.dtype)).reshape(like.shape)
    return (a * b).sum_to_size(like.shape)


def _clamped_u(x, scale, offset, q_n, q_p):
    """u = (x - beta) / s, as x * (1/s) - beta/s, and c = clamp(u, q_n, q_p). Shared by the
    training forward and the integer export path so both round identically."""
    inv = 1.0 / scale
    u = torch.addcmul(-offset * inv, x, inv) if offset is not None else x * inv
    return u, torch.clamp(u, q_n, q_p)


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, offset, q_n, q_p, g):
        u, c = _clamped_u(x, scale, offset, q_n, q_p)
        inside = c == u
        del u
        q = torch.round(c)  # = clamp(round(u), q_n, q_p) for integer bounds
        out = torch.addcmul(offset, q, scale) if offset is not None else q * scale
        tensor_bounds = tuple(isinstance(t, torch.Tensor) for t in (q_n, q_p))
        ctx.save_for_backward(c, q, inside, scale, offset,
                              *(t for t in (q_n, q_p) if isinstance(t, torch.Tensor)))
        ctx.bounds, ctx.g = tensor_bounds, g
        return out

    @staticmethod
    def backward(ctx, grad_out):
        c, q, inside, scale, offset, *qs = ctx.saved_tensors
        g = grad_out
        gx = g * inside
        grad_s = grad_off = grad_qn = grad_qp = None
        if ctx.needs_input_grad[1]:
            # inside: round(u) - u = q - c; outside: q (the bound)  ->  sum g*q - sum g_inside*c
            grad_s = (_wsum(g, q, scale) - _wsum(gx, c, scale)) * ctx.g
        if offset is not None and ctx.needs_input_grad[2]:
            grad_off = (g - gx).sum_to_size(offset.shape) * ctx.g
        it = iter(qs)
        if ctx.bounds[0]:
            q_n = next(it)
            if ctx.needs_input_grad[3]:
                grad_qn = _reduce(g * (~inside & (c == q_n)) * scale, q_n)
        if ctx.bounds[1]:
            q_p = next(it)
            if ctx.needs_input_grad[4]:
                grad_qp = _reduce(g * (~inside & (c == q_p)) * scale, q_p)
        return (gx if ctx.needs_input_grad[0] else None), grad_s, grad_off, grad_qn, grad_qp, None


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    q_n: Number | torch.Tensor,
    q_p: Number | torch.Tensor,
    offset: torch.Tensor | None = None,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """Fake-quantize ``x`` with step ``scale`` (broadcastable to x), optional offset ``beta`` and
    integer level bounds [q_n, q_p]. ``grad_factor`` is LSQ's gradient scale g for s and beta.
    With ``slimtorch.fast_fake_quant(True)`` integer bounds run the compiled core (fake_quant_compiled.py)."""
    if _COMPILED[0] is None:
        from . import fake_quant_compiled
        _COMPILED[0] = fake_quant_compiled
    fc = _COMPILED[0]
    if fc._STATE["on"] and fc._STATE["failed"] is None and type(q_n) is int and type(q_p) is int:
        out = fc.compiled_fake_quant(x, scale, offset, q_n, q_p, float(grad_factor))
        if out is not None:
            return out
    return _FakeQuant.apply(x, scale, offset, q_n, q_p, float(grad_factor))


_COMPILED: list = [None]


@torch.no_grad()
def quantize_int(x, scale, q_n, q_p, offset=None) -> torch.Tensor:
    """The integer levels x_bar that ``fake_quant`` multiplies back (same arithmetic, exact)."""
    return torch.round(_clamped_u(x, scale, offset, q_n, q_p)[1])


def dequantize(x_bar: torch.Tensor, scale, offset=None) -> torch.Tensor:
    """x_bar * s + beta, the inverse map used by export (bit-identical to the fake-quant output)."""
    x_bar = x_bar.to(scale.dtype)
    return torch.addcmul(offset, x_bar, scale) if offset is not None else x_bar * scale
