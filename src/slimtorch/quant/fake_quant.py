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


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, offset, q_n, q_p, g):
        u = x - offset if offset is not None else x
        u = u / scale
        out = torch.clamp(torch.round(u), q_n, q_p) * scale
        if offset is not None:
            out = out + offset
        ctx.save_for_backward(x, scale, offset, *(t for t in (q_n, q_p) if isinstance(t, torch.Tensor)))
        ctx.bounds = tuple(isinstance(t, torch.Tensor) for t in (q_n, q_p))
        ctx.q_consts = (q_n, q_p)
        ctx.g = g
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, scale, offset, *qs = ctx.saved_tensors
        q_n, q_p = ctx.q_consts
        it = iter(qs)
        q_n = next(it) if ctx.bounds[0] else q_n
        q_p = next(it) if ctx.bounds[1] else q_p
        u = (x - offset) / scale if offset is not None else x / scale
        below, above = u < q_n, u > q_p
        inside = ~(below | above)
        grad_x = grad_out * inside if ctx.needs_input_grad[0] else None
        grad_s = grad_off = grad_qn = grad_qp = None
        if ctx.needs_input_grad[1]:
            q = torch.clamp(torch.round(u), q_n, q_p)
            grad_s = _reduce(grad_out * (q - u * inside), scale) * ctx.g
        if offset is not None and ctx.needs_input_grad[2]:
            grad_off = _reduce(grad_out * (~inside), offset) * ctx.g
        if ctx.bounds[0] and ctx.needs_input_grad[3]:
            grad_qn = _reduce(grad_out * below * scale, q_n)
        if ctx.bounds[1] and ctx.needs_input_grad[4]:
            grad_qp = _reduce(grad_out * above * scale, q_p)
        return grad_x, grad_s, grad_off, grad_qn, grad_qp, None


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    q_n: Number | torch.Tensor,
    q_p: Number | torch.Tensor,
    offset: torch.Tensor | None = None,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """Fake-quantize ``x`` with step ``scale`` (broadcastable to x), optional offset ``beta`` and
    integer level bounds [q_n, q_p]. ``grad_factor`` is LSQ's gradient scale g for s and beta."""
    return _FakeQuant.apply(x, scale, offset, q_n, q_p, float(grad_factor))


@torch.no_grad()
def quantize_int(x, scale, q_n, q_p, offset=None) -> torch.Tensor:
    """The integer levels x_bar that ``fake_quant`` multiplies back (same arithmetic, exact)."""
    u = x - offset if offset is not None else x
    return torch.clamp(torch.round(u / scale), float(q_n), float(q_p))


def dequantize(x_bar: torch.Tensor, scale, offset=None) -> torch.Tensor:
    """x_bar * s + beta, the inverse map used by export (bit-identical to the fake-quant output)."""
    out = x_bar.to(scale.dtype) * scale
    return out + offset if offset is not None else out
