"""Weight <-> sub-vectors, per layer type, as fairseq's PQ (``modules/quantization/pq/pq.py``,
papers.md Sec. 6a "iPQ"; block sizes from ``examples/quant_noise``'s yaml and docstring).

Every weight is viewed as (out, D) with D the elements one output unit reads, and each row is cut
into D / d blocks of d contiguous elements, so the sub-vector matrix is ``w.reshape(-1, d)``
(row-major: the codes reshape to (out, D / d), which a lookup-table matmul reads directly):
    Linear (out, in), Embedding (num, dim)   D = in / dim
    Conv1d (out, in/g, k), Conv2d (out, in/g, kh, kw)   D = in/g * k(h*kw), the flattened dimension
      (1x1: blocks along in_channels; kxk with d = kh*kw: one block per kernel, fairseq's case)
Defaults: Linear 8 (fairseq: FFN 8, attention 4), Embedding 8, Conv 1x1 4, Conv kxk kh*kw (3x3 -> 9)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError

#: the layer kinds a ``block_sizes`` mapping names, with their default block size (None: kh * kw)
KINDS = {"linear": 8, "embedding": 8, "conv1x1": 4, "conv": None}


def block_kind(module: nn.Module) -> str:
    """"linear" | "embedding" | "conv1x1" | "conv" (kxk, Conv1d with k > 1 included)."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv1x1" if math.prod(module.kernel_size) == 1 else "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    raise ConfigError(f"product quantization supports Linear, Conv1d, Conv2d and Embedding, "
                      f"not {type(module).__name__}")


def block_dim(module: nn.Module, weight: torch.Tensor) -> int:
    """D: the elements one output unit (row) of the weight holds."""
    return weight[0].numel()


def default_block_size(module: nn.Module) -> int:
    kind = block_kind(module)
    return KINDS[kind] if KINDS[kind] is not None else math.prod(module.kernel_size)


def divisors(n: int, limit: int = 64) -> list[int]:
    return [v for v in range(1, min(n, limit) + 1) if n % v == 0]


def check_block_size(name: str, module: nn.Module, weight: torch.Tensor, d: int) -> None:
    """ConfigError naming the layer, its dimension and the block sizes that would divide it."""
    dim = block_dim(module, weight)
    if dim % d:
        what = {"linear": "in_features", "embedding": "embedding_dim"}.get(
            block_kind(module), "in_channels/groups x kernel elements")
        raise ConfigError(f"layer {name!r} ({type(module).__name__}, weight {list(weight.shape)}): block_size {d} "
                          f"does not divide its {what} {dim}; block sizes that would: {divisors(dim)}")


def to_blocks(weight: torch.Tensor, d: int) -> torch.Tensor:
    """The (numel / d, d) sub-vector matrix of ``weight`` (rows cut into contiguous blocks)."""
    return weight.reshape(-1, d)


def from_blocks(blocks: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`to_blocks`."""
    return blocks.reshape(shape)


__all__ = ["KINDS", "block_kind", "block_dim", "default_block_size", "check_block_size", "divisors",
           "to_blocks", "from_blocks"]
