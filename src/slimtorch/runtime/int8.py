"""Int8 GEMM runtime for Linear layers of a loaded packed model (``load_packed(runtime="int8")``).

    q   = clamp(round((x - beta) / s_a), q_n, q_p) - shift      (shift moves [q_n, q_p] into int8)
    acc = q @ W_int^T  (int32, torch._int_mm: oneDNN VNNI/AMX kernels on x86)
    y   = (acc + shift * colsum(W_int)) * (s_a * s_w) + (b + beta * s_w * colsum(W_int))

The integer part is exact; the result differs from the fake-quant float path only by float
rounding (~1e-6 relative). Layers that do not fit (no input quantizer, per-channel activation
steps, weight offsets, non-affine codes, > 8 bits) stay on the float path."""
from __future__ import annotations

import torch
from torch import nn

from ..attach import input_quantizer


class Int8Linear(nn.Module):
    """A Linear layer on integer weights and integer-quantized inputs (see the module docstring)."""

    def __init__(self, w_levels: torch.Tensor, w_scale: torch.Tensor, bias, a_scale: float,
                 a_offset: float | None, q_n: int, q_p: int):
        super().__init__()
        self.out_features, self.in_features = w_levels.shape
        # levels [q_n, q_p] (any integer zero point) shifted into int8's [-128, 127]
        self.shift = 0 if q_n >= -128 and q_p <= 127 else q_n + 128
        self.q_n, self.q_p, self.a_scale = q_n, q_p, a_scale
        self.a_offset = a_offset
        w = w_levels.to(torch.int8).contiguous()
        self.register_buffer("w_int", w)
        colsum = w.to(torch.int32).sum(1)
        self.register_buffer("acc_shift", (self.shift * colsum).to(torch.int32))
        s_w = w_scale.reshape(-1).float().expand(self.out_features)
        a = torch.tensor(a_scale, dtype=torch.float32)
        self.register_buffer("out_scale", (a * s_w).contiguous())
        b = bias.detach().float().clone() if bias is not None else torch.zeros(self.out_features)
        if a_offset is not None:
            b = b + a_offset * s_w * colsum.float()
        self.register_buffer("bias_eff", b)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"act=[{self.q_n}, {self.q_p}] step {self.a_scale:.4g}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x - self.a_offset if self.a_offset is not None else x
        q = torch.round(u / self.a_scale).clamp_(self.q_n, self.q_p)
        if self.shift:
            q.sub_(self.shift)
        q = q.to(torch.int8).reshape(-1, self.in_features)
        acc = torch._int_mm(q, self.w_int.t())
        if self.shift:
            acc += self.acc_shift
        y = torch.addcmul(self.bias_eff, acc.to(torch.float32), self.out_scale)
        return y.reshape(*x.shape[:-1], self.out_features)


def int8_linear(module: nn.Module, wq, codes) -> Int8Linear | None:
    """An Int8Linear equivalent to ``module`` (float-loaded, input quantizer attached), or None."""
    aq = input_quantizer(module)
    if not isinstance(module, nn.Linear) or wq is None or aq is None or codes is None:
        return None
    try:
        pw, pa = wq.quant_params(), aq.quant_params()
    except Exception:
        return None
    if pw.get("kind", "uniform") != "uniform" or pa.get("kind", "uniform") != "uniform":
        return None
    if pw["offset"] is not None or pa["scale"].numel() != 1:
        return None
    if pa["offset"] is not None and pa["offset"].numel() != 1:
        return None
    levels = codes + int(pw["q_n"])
    q_n, q_p = int(pa["q_n"]), int(pa["q_p"])
    if levels.min() < -128 or levels.max() > 127 or q_p - q_n > 255 or q_n < -128 or q_p > 255:
        return None
    w_scale = pw["scale"].reshape(-1)
    if w_scale.numel() not in (1, module.out_features):
        return None
    if not torch.equal(levels.to(w_scale.dtype) * pw["scale"], module.weight.detach()):
        return None                                   # decode is not the affine grid
    offset = None if pa["offset"] is None else float(pa["offset"].reshape(()))
    return Int8Linear(levels, w_scale, module.bias, float(pa["scale"].reshape(())), offset, q_n, q_p)


def convert_int8(model: nn.Module, layers: dict) -> list[str]:
    """Swap every eligible Linear in ``layers`` ({name: (weight quantizer, codes)}) for an
    Int8Linear in place; returns the names converted."""
    done = []
    for name, (wq, codes) in layers.items():
        if not name:
            continue
        new = int8_linear(model.get_submodule(name), wq, codes)
        if new is None:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        done.append(name)
    return done
