"""Lookup-table (LUT) matmul for product-quantized Linear layers (Stock et al. 2020, Fan et al.
2021; papers.md Sec. 6a and "Efficient product-quantization (lookup-table) kernels": Bolt,
MADDNESS, LUT-NN).

A PQ weight W (out x D) holds, per row o, J = D / d codes a_{o,j} into the centroids C (K x d):
W[o, j d : (j+1) d] = c_{a_{o,j}} (pq/blocks.py). For an input row x_n cut into the same blocks,

    y[n, o] = b_o + sum_j x_{n,j} . c_{a_{o,j}} = b_o + sum_j T[n, j, a_{o,j}],
    T[n, j, k] = x_{n,j} . c_k            (the table: N J K entries, N D K multiply-adds)

so the matmul becomes one small GEMM (the table) and out * J gather-adds per input row, instead
of N D out multiply-adds. It pays when the table is cheap against the dense GEMM (K << out) and
the batch is small; the dense path (``PQLinear`` mode "dense") rebuilds W = C[codes] once.

Layout (the fastest of those measured here: advanced indexing, ``index_select``, ``take_along_dim``,
per-block batched matmul + ``embedding_bag``): the table is one GEMM T = C @ X' with X' (d x J N)
the input blocks ordered (j, n), so T viewed as (K J) x N has row k J + j = the N values
x_{n,j} . c_k; the gather-and-sum is ``embedding_bag(mode="sum")`` of the rows a_{o,j} J + j
(``lut_index``, int32) over each output o, one fused kernel with no (N, out, J) intermediate
(one input row: ``index_select`` of the flat table and a sum over J, faster than 1-float rows).
The batch is chunked so the table holds at most ``TABLE_ELEMENTS`` floats (2^20 was fastest of
2^14..2^21 here: larger tables fall out of cache, smaller ones narrow the gathered rows)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..pq.kmeans import code_dtype

TABLE_ELEMENTS = 1 << 20          # floats of one table chunk (4 MiB at float32; fastest measured)
MODES = ("auto", "lut", "dense")


def lut_index(codes: torch.Tensor, n_centroids: int) -> torch.Tensor:
    """int32 (out, J): the table row a_{o,j} J + j of every code (codes (out, J), any int dtype)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be (out, J), got shape {tuple(codes.shape)}")
    j = codes.shape[1]
    if n_centroids * j >= 1 << 31:
        raise ValueError(f"a table of {n_centroids} x {j} rows does not fit int32 indices")
    steps = torch.arange(j, dtype=torch.int64, device=codes.device)
    return (codes.long() * j + steps).to(torch.int32).contiguous()


def lut_table(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """T as (K J) x N for input rows ``x`` (N x D): T[k J + j, n] = x_{n,j} . c_k (one GEMM)."""
    n, dim = x.shape
    k, d = centroids.shape
    blocks = x.reshape(n, dim // d, d).permute(2, 1, 0).reshape(d, -1)     # (d, J N), (j, n) order
    return torch.mm(centroids, blocks).view(k * (dim // d), n)


def lut_matmul(x: torch.Tensor, centroids: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None = None,
               table_elements: int = TABLE_ELEMENTS) -> torch.Tensor:
    """y = x W^T + b with W = C[codes] never built: ``index`` = ``lut_index(codes, K)``; ``x``
    (..., D) with D = J d; the batch is processed in chunks of at most ``table_elements`` table
    floats. Equals ``F.linear(x, W, bias)`` up to float rounding (sums in another order)."""
    out, j = index.shape
    k, d = centroids.shape
    dim = j * d
    if x.shape[-1] != dim:
        raise ValueError(f"input has {x.shape[-1]} features, the PQ weight reads {dim} ({j} blocks of {d})")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, dim)
    c = centroids.to(x2.dtype)
    step = max(1, table_elements // (k * j))
    if x2.shape[0] == 1:                  # one row: a flat gather + row sums beat embedding_bag's 1-wide rows
        y = lut_table(x2, c).view(-1).index_select(0, index.view(-1)).view(out, j).sum(1, keepdim=True).t()
        y = y + bias if bias is not None else y
    elif x2.shape[0] <= step:
        y = F.embedding_bag(index, lut_table(x2, c), mode="sum").t()
        y = y + bias if bias is not None else y.contiguous()
    else:
        y = torch.empty(x2.shape[0], out, dtype=x2.dtype, device=x2.device)
        for s in range(0, x2.shape[0], step):
            part = F.embedding_bag(index, lut_table(x2[s:s + step], c), mode="sum").t()
            y[s:s + step] = part + bias if bias is not None else part
    return y.reshape(*lead, out)


def dense_weight(centroids: torch.Tensor, codes: torch.Tensor, in_features: int) -> torch.Tensor:
    """W = C[codes] reshaped to (out, in_features), as the Codebook transform computes it."""
    return centroids[codes.reshape(-1).long()].reshape(-1, in_features)


class PQLinear(nn.Module):
    """A product-quantized Linear at inference: centroids (K x d), codes (out x J) and bias.

    ``mode``: "lut" (``lut_matmul``, the dense weight never exists), "dense" (W = C[codes] built
    once on first use, cached, then ``F.linear``: bit-identical to the fake-quant layer) or "auto"
    (whichever ``pq_select.pick_kernel`` measures faster for this shape at ``batch`` input rows;
    the choice is cached per shape in the process). ``kernel`` is the resolved choice. Under ONNX
    export the weight is a Gather of the codebook by the codes (onnx_pq.py)."""

    def __init__(self, centroids: torch.Tensor, codes: torch.Tensor, in_features: int,
                 bias: torch.Tensor | None = None, mode: str = "auto", batch: int = 1):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"PQLinear mode={mode!r}; expected one of {MODES}")
        k, d = centroids.shape
        if in_features % d or codes.numel() % (in_features // d):
            raise ValueError(f"{codes.numel()} codes of blocks of {d} do not make rows of {in_features} features")
        self.in_features, self.out_features = in_features, codes.numel() // (in_features // d)
        self.register_buffer("centroids", centroids.detach().clone())
        self.register_buffer("codes", codes.detach().reshape(self.out_features, -1).to(code_dtype(k)).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._dense: torch.Tensor | None = None
        self._index: torch.Tensor | None = None
        self.mode = mode
        if mode == "auto":
            from .pq_select import pick_kernel
            mode = pick_kernel(self.out_features, in_features, d, k, batch=batch, dtype=centroids.dtype)
        self.kernel = mode

    @property
    def n_centroids(self) -> int:
        return self.centroids.shape[0]

    @property
    def block_size(self) -> int:
        return self.centroids.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight C[codes] (built on first use and cached; reading it in "lut" mode
        materialises it too, as code written for nn.Linear expects)."""
        w = self._dense
        if w is None or w.device != self.centroids.device or w.dtype != self.centroids.dtype:
            w = self._dense = dense_weight(self.centroids, self.codes, self.in_features)
        return w

    def index(self) -> torch.Tensor:
        """The LUT gather rows ``lut_index(codes, K)`` (int32, built and cached on first call)."""
        if self._index is None or self._index.device != self.codes.device:
            self._index = lut_index(self.codes, self.n_centroids)
        return self._index

    def _apply(self, fn, *args, **kwargs):
        self._dense = self._index = None      # .to() / .half(): rebuilt from the moved buffers
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            from ..export.onnx_pq import gather_weight
            return F.linear(x, gather_weight(self.centroids, self.codes, (self.out_features, self.in_features)),
                            self.bias)
        if self.kernel == "lut":
            return lut_matmul(x, self.centroids, self.index(), self.bias)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"n_centroids={self.n_centroids}, block_size={self.block_size}, kernel={self.kernel!r}"
                + (" (auto)" if self.mode == "auto" else ""))


__all__ = ["PQLinear", "lut_matmul", "lut_table", "lut_index", "dense_weight", "MODES", "TABLE_ELEMENTS"]
