"""Binary decomposition of mixed-precision integer products (EBS, Li et al. 2020, Fig. 1 deploy stage):

    W = sum_i c_i W_i,  X = sum_j c_j X_j,   W_i, X_j in {0, 1}      (bit planes)
    W X^T = sum_{i,j} c_i c_j popcount(W_i AND X_j)                  (= Lambda_w (B_w B_x) Lambda_x^T)

with c_i = 2^i, except the sign plane of a two's-complement b-bit integer, c_{b-1} = -2^(b-1). Every
b_w-bit x b_a-bit product becomes b_w * b_a binary products (AND + popcount over packed bytes): this
proves the arithmetic exact and counts the binary operations (the seed note's "~4x more elements" for
2-bit x 2-bit); it is not a fast kernel. Scales and zero points stay outside the integer product:
for a layer with weight W_hat = s_w * W_int and input x_hat = s_x * x_bar + beta,

    y = s_w s_x (W_int x_bar) + s_w beta rowsum(W_int) + bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


@dataclass
class BinaryOps:
    """Work of one decomposed product: AND-popcount operations on single bits (``bit_ops`` =
    b_w * b_a * MACs), the packed byte ANDs that carry them, and the integer MACs it replaces."""
    bit_ops: int
    byte_ands: int
    int_macs: int

    @property
    def expansion(self) -> float:
        return self.bit_ops / max(self.int_macs, 1)


def bit_planes(x: torch.Tensor, bits: int, signed: bool) -> tuple[torch.Tensor, list[int]]:
    """(planes, coefficients): ``planes[i]`` = bit i of x as 0/1 (two's complement when signed),
    ``x == sum_i coefficients[i] * planes[i]`` exactly. ConfigError if x is off the b-bit range."""
    if not 1 <= bits <= 16:
        raise ConfigError(f"bits={bits}: expected 1..16")
    x = x.to(torch.int64)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if x.numel() and (int(x.min()) < lo or int(x.max()) > hi):
        raise ConfigError(f"values in [{int(x.min())}, {int(x.max())}] do not fit {bits}-bit "
                          f"{'signed' if signed else 'unsigned'} integers [{lo}, {hi}]")
    u = x & ((1 << bits) - 1)                    # two's complement code
    planes = torch.stack([(u >> i) & 1 for i in range(bits)]).to(torch.uint8)
    coef = [1 << i for i in range(bits)]
    if signed:
        coef[-1] = -coef[-1]
    return planes, coef


def pack_rows(planes: torch.Tensor) -> torch.Tensor:
    """0/1 values (..., K) -> bytes (..., ceil(K / 8)), 8 bits per byte along K (zero padded)."""
    k = planes.shape[-1]
    pad = (-k) % 8
    p = F.pad(planes.to(torch.int64), (0, pad)).reshape(*planes.shape[:-1], -1, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=planes.device)
    return (p << shifts).sum(-1).to(torch.uint8)


def popcount_and(a: torch.Tensor, b: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """popcount(a_m AND b_n) for packed rows a (M, Kb) and b (N, Kb) -> int64 (M, N)."""
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.int64, device=a.device)
    table = _POPCOUNT.to(a.device)
    for s in range(0, a.shape[0], chunk):
        anded = a[s:s + chunk, None, :] & b[None, :, :]
        out[s:s + chunk] = table[anded.to(torch.int64)].sum(-1)
    return out


def binary_matmul(a: torch.Tensor, b: torch.Tensor, a_bits: int, b_bits: int, a_signed: bool = True,
                  b_signed: bool = False) -> tuple[torch.Tensor, BinaryOps]:
    """Integer a (M, K) times b (N, K)^T through bit planes: sum_{i,j} c_i c_j popcount(A_i AND B_j)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ConfigError(f"expected a (M, K) and b (N, K), got {tuple(a.shape)} and {tuple(b.shape)}")
    pa, ca = bit_planes(a, a_bits, a_signed)
    pb, cb = bit_planes(b, b_bits, b_signed)
    packed_a, packed_b = pack_rows(pa), pack_rows(pb)
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int64, device=a.device)
    for i, ci in enumerate(ca):
        for j, cj in enumerate(cb):
            out += ci * cj * popcount_and(packed_a[i], packed_b[j])
    m, n, k = a.shape[0], b.shape[0], a.shape[1]
    ops = BinaryOps(a_bits * b_bits * m * n * k, a_bits * b_bits * m * n * packed_a.shape[-1], m * n * k)
    return out, ops


@torch.no_grad()
def binary_linear(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, BinaryOps]:
    """The output of a quantized nn.Linear (weight and input quantizers attached) with the integer
    product done by binary decomposition: signed weight levels W_int (two's complement planes) times
    the input's unsigned codes x_code = x_bar - q_n; q_n, scales, offset and bias stay outside:
    y = s_w s_x (W_int x_code + q_n rowsum(W_int)) + s_w beta rowsum(W_int) + bias."""
    from ..attach import input_quantizer, transform_input
    from ..quant.api import weight_quantizer
    wq, aq = weight_quantizer(layer), input_quantizer(layer)
    if not isinstance(layer, nn.Linear) or wq is None or aq is None:
        raise ConfigError("binary_linear needs an nn.Linear with weight and input quantizers (quantize_)")
    pw, px = wq.quant_params(), aq.quant_params()
    if not isinstance(px["q_n"], int) or px["scale"].numel() != 1:
        raise ConfigError("binary_linear needs a per-tensor input quantizer")
    w_int = wq.to_int(transform_input(layer, wq).detach()).to(torch.int64)
    flat = x.reshape(-1, x.shape[-1])
    codes = aq.encode(flat)
    prod, ops = binary_matmul(w_int, codes, wq.bits, aq.bits, a_signed=True, b_signed=False)
    s_w = pw["scale"].double().reshape(-1)                 # (out,) or (1,)
    s_x = px["scale"].double().reshape(())
    rows = w_int.sum(1).double()
    y = s_w * s_x * (prod.T.double() + px["q_n"] * rows)
    if px["offset"] is not None:
        y = y + s_w * px["offset"].double().reshape(()) * rows
    if layer.bias is not None:
        y = y + layer.bias.detach().double()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1), ops
