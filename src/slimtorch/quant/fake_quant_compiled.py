"""Opt-in fused fake quantization: the fake-quant core written as plain tensor expressions and compiled
with ``torch.compile`` (issue 15: the eager core makes ~10 passes over memory per quantizer per step;
the compiled forward and backward are one fused loop each).

    st.fast_fake_quant(True)      # every LSQ/LSQ+ quantizer with integer levels uses the compiled core

The expression is the core's own arithmetic (u = x * (1/s) [- beta/s], clamp, round, q * s [+ beta]),
so the forward values are the eager core's (tested bit for bit, which keeps the packed export and ONNX
exact); the gradients are LSQ's straight-through ones (Eq. 3-5), obtained by autograd through

    q = clamp(u) + stop_grad(round(clamp(u)) - clamp(u)),   s and beta through grad_scale(., g)

and equal the eager core's up to summation order. torch.compile needs a C++ compiler on CPU (Triton on
GPU); where compilation fails the first call warns once and the eager core is used from then on.
Compilation takes tens of seconds once per process (shapes are generalised after the first recompile).
"""
from __future__ import annotations

import warnings

import torch

_STATE = {"on": False, "fns": {}, "failed": None}


def _grad_scaled(x, g: float):
    """x with the same values (x + 0, exactly) and gradient times g in the backward pass."""
    t = x * g
    return x.detach() + (t - t.detach())


def lsq_expression(x, scale, offset, q_n: int, q_p: int, g: float):
    """LSQ / LSQ+ fake quantization as differentiable tensor expressions (what gets compiled)."""
    s = _grad_scaled(scale, g)
    inv = 1.0 / s
    if offset is None:
        u = x * inv
    else:
        b = _grad_scaled(offset, g)
        u = torch.addcmul(-b * inv, x, inv)
    c = torch.clamp(u, q_n, q_p)
    q = (torch.round(c) - c).detach() + c
    return torch.addcmul(b, q, s) if offset is not None else q * s


def fast_fake_quant(enabled: bool = True) -> bool:
    """Use the compiled core (True) or the eager one (False) from now on; returns the previous setting."""
    prev = _STATE["on"]
    _STATE["on"] = bool(enabled)
    return prev


def _compiled(key):
    """One compiled function per (offset?, ranks, dtype): shapes and level bounds stay symbolic inside
    it, so a model compiles a handful of kernels once. fp-contract=fast: a*b + c compiles to the fused
    multiply-add the eager addcmul kernels use, so offset grids round exactly as the eager core does."""
    fn = _STATE["fns"].get(key)
    if fn is None:
        fn = _STATE["fns"][key] = torch.compile(lsq_expression, dynamic=True,
                                                options={"cpp.enable_floating_point_contract_flag": "fast"})
    return fn


def enabled() -> bool:
    return _STATE["on"] and _STATE["failed"] is None


def compiled_fake_quant(x, scale, offset, q_n: int, q_p: int, g: float):
    """The compiled core, or None when compilation failed (the caller then runs the eager core)."""
    key = (offset is None, x.dim(), scale.dim(), x.dtype, x.device.type)
    try:
        return _compiled(key)(x, scale, offset, q_n, q_p, g)
    except Exception as e:           # no C++ compiler, an unsupported device, ...
        _STATE["failed"] = f"{type(e).__name__}: {e}"
        warnings.warn(f"fast_fake_quant: torch.compile failed ({_STATE['failed'][:200]}); using the eager "
                      "fake-quant core", stacklevel=3)
        return None
