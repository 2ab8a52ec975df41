"""The product-quantized weight as a weight transform (a parametrization of ``weight``, attach.py):
W' = C[codes] reshaped, with C (K x d) the ``centroids`` (trainable) and ``codes`` (one per
sub-vector, blocks.py) a buffer (Stock et al. 2020; fairseq ``pq/modules/qlinear.py``, ``qconv.py``,
``qemb.py``; papers.md Sec. 6a).

The transform ignores the values it receives (only their shape and dtype): the stored float weight
stays as it is, gets no gradient, and is what a removed codebook gives back.

Centroid gradient = MEAN of the gradients of the sub-vectors assigned to it, for every layer type
(fairseq registers ``centroids.register_hook(lambda g: g / counts[:, None])`` in PQConv2d only;
PQLinear and PQEmbedding sum, papers.md Sec. 6a): dL/dc_k = (1 / n_k) sum_{a_i = k} dL/dw_i, 0 for
a centroid with n_k = 0. The counts come from ``codes`` at every forward (never stale).

``int8_centroids``: C is fake-quantized per tensor, symmetric, s = max|C| / 127,
C_q = clamp(round(C / s), -127, 127) s (straight-through), so the file stores int8 + one scale."""
from __future__ import annotations

import torch
from torch import nn

from .blocks import from_blocks, to_blocks
from .kmeans import KMeansResult, code_bits, kmeans

INT8_MAX = 127


class _GatherMean(torch.autograd.Function):
    """centroids[index] forward; backward: per centroid the mean of its rows' gradients."""

    @staticmethod
    def forward(ctx, centroids, index):
        ctx.save_for_backward(index)
        ctx.k = centroids.shape[0]
        return centroids.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        total = torch.zeros(ctx.k, grad.shape[1], dtype=grad.dtype, device=grad.device).index_add_(0, index, grad)
        counts = torch.bincount(index, minlength=ctx.k).clamp_min_(1).to(grad.dtype)
        return total / counts.unsqueeze(1), None


def int8_scale(c: torch.Tensor) -> torch.Tensor:
    """s = max|C| / 127 (float32 scalar; 1 when C is all zero)."""
    m = c.detach().abs().amax().float()
    return torch.where(m > 0, m / INT8_MAX, torch.ones_like(m))


def int8_codes(c: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(c.detach().float() / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def int8_dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


class Codebook(nn.Module):
    """W' = centroids[codes] reshaped to ``shape`` (``cost_role`` "codebook", slimtorch.cost)."""

    cost_role = "codebook"

    def __init__(self, centroids: torch.Tensor, codes: torch.Tensor, shape, int8_centroids: bool = False):
        super().__init__()
        k, d = centroids.shape
        shape = tuple(int(s) for s in shape)
        if codes.numel() * d != torch.Size(shape).numel():
            raise ValueError(f"{codes.numel()} codes of {d} elements do not fill a weight of shape {list(shape)}")
        self.centroids = nn.Parameter(centroids.detach().clone())
        self.register_buffer("codes", codes.detach().reshape(-1).clone())
        self.shape = shape
        self.int8_centroids = bool(int8_centroids)

    @classmethod
    @torch.no_grad()
    def fit(cls, weight: torch.Tensor, block_size: int, n_centroids: int = 256, n_iter: int = 20,
            seed: int = 0, int8_centroids: bool = False, what: str = "layer") -> tuple["Codebook", KMeansResult]:
        """k-means (kmeans.py) on the sub-vectors of ``weight`` -> (Codebook, k-means result)."""
        res = kmeans(to_blocks(weight.detach(), block_size), n_centroids, n_iter, seed, what=what)
        return cls(res.centroids.to(weight.dtype), res.codes, weight.shape, int8_centroids), res

    @property
    def n_centroids(self) -> int:
        return self.centroids.shape[0]

    @property
    def block_size(self) -> int:
        return self.centroids.shape[1]

    @property
    def index_bits(self) -> int:
        """Bits per code when bit-packed: ceil(log2 K)."""
        return code_bits(self.n_centroids)

    def int8_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 centroids, float32 scale) as stored; the forward uses int8_dequant of them."""
        s = int8_scale(self.centroids)
        return int8_codes(self.centroids, s), s

    def effective_centroids(self) -> torch.Tensor:
        """The centroids the forward uses: C, or its int8 fake-quantization (straight-through)."""
        c = self.centroids
        if not self.int8_centroids:
            return c
        q = int8_dequant(*self.int8_state()).to(c.dtype)
        return q + (c - c.detach())          # value exactly q; gradient identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != self.shape:
            raise RuntimeError(f"Codebook of a weight of shape {list(self.shape)} received shape {list(x.shape)}")
        w = _GatherMean.apply(self.effective_centroids(), self.codes.long())
        return from_blocks(w, self.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"n_centroids={self.n_centroids}, block_size={self.block_size}, codes={self.codes.numel()}"
                + (", int8_centroids=True" if self.int8_centroids else ""))


__all__ = ["Codebook", "int8_scale", "int8_codes", "int8_dequant"]
