"""The product-quantization config (Stock et al. 2020; Fan et al. 2021 "Quant-Noise", iPQ;
papers.md Sec. 6b defaults): a frozen dataclass registered with the method configs
(``config_from_dict({"method": "pq", ...})``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..config import register_config
from ..errors import ConfigError
from .blocks import KINDS, block_kind, default_block_size
from .kmeans import MAX_CENTROIDS


def _int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int)


@register_config("pq")
@dataclass(frozen=True)
class PQ:
    """Product quantization of Linear / Conv1d / Conv2d / Embedding weights (``pq_``).

    n_centroids: K per layer (256, fairseq's yaml; fewer when a layer has fewer sub-vectors, with a
        warning). Indices cost ceil(log2 K) bits per block.
    block_size: d for every selected layer; None = per kind: ``block_sizes`` or the defaults
        Linear 8, Embedding 8, Conv 1x1 4, Conv kxk kh*kw (blocks.py; fairseq uses 4 for attention).
    block_sizes: per-kind overrides {"linear", "embedding", "conv1x1", "conv": d}.
    n_iter: k-means iterations (20, fairseq's EM class; its quantize_model_ uses 15).
    seed: the k-means initialisation's seed (every rank gets the same codebook).
    int8_centroids: store centroids as int8 + one float32 scale per layer (iPQ + int8, fake-quantized
        straight-through during fine-tuning)."""
    n_centroids: int = 256
    block_size: Optional[int] = None
    block_sizes: Optional[dict[str, int]] = None
    n_iter: int = 20
    seed: int = 0
    int8_centroids: bool = False

    def __post_init__(self):
        if not _int(self.n_centroids) or not 2 <= self.n_centroids <= MAX_CENTROIDS:
            raise ConfigError(f"PQ: n_centroids={self.n_centroids!r}; expected an integer in 2..{MAX_CENTROIDS} "
                              "(centroids per layer, 256 in the paper)")
        if self.block_size is not None and (not _int(self.block_size) or self.block_size < 1):
            raise ConfigError(f"PQ: block_size={self.block_size!r}; expected an integer >= 1 or null "
                              "(null: per layer kind, Linear 8, Embedding 8, Conv 1x1 4, Conv kxk kh*kw)")
        if self.block_sizes is not None:
            if not isinstance(self.block_sizes, dict):
                raise ConfigError(f"PQ: block_sizes={self.block_sizes!r}; expected a mapping of {sorted(KINDS)}")
            bad = sorted(set(self.block_sizes) - set(KINDS))
            if bad:
                raise ConfigError(f"PQ: block_sizes: unknown layer kind(s) {bad}; known: {sorted(KINDS)}")
            for k, v in self.block_sizes.items():
                if not _int(v) or v < 1:
                    raise ConfigError(f"PQ: block_sizes[{k!r}]={v!r}; expected an integer >= 1")
            object.__setattr__(self, "block_sizes", dict(self.block_sizes))
        if not _int(self.n_iter) or self.n_iter < 1:
            raise ConfigError(f"PQ: n_iter={self.n_iter!r}; expected an integer >= 1 (k-means iterations)")
        if not _int(self.seed) or self.seed < 0:
            raise ConfigError(f"PQ: seed={self.seed!r}; expected an integer >= 0")
        if not isinstance(self.int8_centroids, bool):
            raise ConfigError(f"PQ: int8_centroids={self.int8_centroids!r}; expected true or false")

    def block_size_for(self, module: nn.Module) -> int:
        """d of ``module``: ``block_size``, else ``block_sizes[kind]``, else the kind's default."""
        if self.block_size is not None:
            return self.block_size
        kind = block_kind(module)
        if self.block_sizes and kind in self.block_sizes:
            return self.block_sizes[kind]
        return default_block_size(module)


__all__ = ["PQ"]
