"""The Quant-Noise config (Fan, Stock et al., ICLR 2021, arXiv 2004.07320; papers.md Sec. 6): a frozen
dataclass registered as ``method: quant_noise`` (``config_from_dict`` / recipes rebuild it).

    p           the noise rate: the fraction of blocks dropped (mode "pq", p in [0, 1)), of blocks
                replaced by their centroid (mode "pq_exact", p in (0, 1]; p = 1 is iPQ QAT) or of
                weights fake-quantized (mode "scalar", p in [0, 1)) at each training forward
    mode        "pq": block dropping, W_used = W * (1 - M) / (1 - p), M ~ Bernoulli(p) per block
                (fairseq quant_noise.py, the proxy noise of product quantization);
                "pq_exact": the selected blocks take their current k-means centroid, straight-through
                (the paper's exact PQ noise / "QAT" column; pq/noise_exact.py);
                "scalar": intN noise, a fraction p of the elements replaced by their fake-quantized
                value, straight-through (fairseq IntLinear)
    block_size  modes "pq" and "pq_exact": elements per block, contiguous along the input features
                (None: fairseq's defaults per layer type: Linear / Embedding 8, Conv 1x1 4, Conv kxk the
                whole kh x kw kernel of each (out, in) pair; pq/noise.py ``block_size_for``)
    bits        mode "scalar": 2..8, or "layer": the bits of the layer's own weight quantizer (so the
                noise follows a HAWQ or Uhlich plan)
    embeddings  also noise nn.Embedding weights (fairseq applies Quant-Noise to embeddings)
    n_centroids mode "pq_exact": K of each layer's codebook (None: 256, as ``PQ``; fewer when a layer
                has fewer blocks, with a warning)
    n_iter      mode "pq_exact": k-means iterations of each fit and refresh (None: 20, as ``PQ``)
    update_every  mode "pq_exact": refit the codebooks every N optimizer steps (``st.step``; None: 100,
                our choice for short runs; fairseq's scalar noise refreshes its observer every 1000)

fairseq's recommended rates: 0.05-0.2 for "pq" (block 8), 0.5 for "scalar"; "pq_exact" at p = 1 is the
paper's iPQ quantization-aware-training baseline."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

from ..config import register_config
from ..errors import ConfigError
from ..quant.quantizer import MAX_BITS, MIN_BITS

MODES = ("pq", "scalar", "pq_exact")
EXACT_DEFAULTS = {"n_centroids": 256, "n_iter": 20, "update_every": 100}   # mode "pq_exact"


@register_config("quant_noise")
@dataclass(frozen=True)
class QuantNoise:
    """Quant-Noise (training-time weight noise; identity in eval). See the module docstring."""
    p: float = 0.1
    mode: Literal["pq", "scalar", "pq_exact"] = "pq"
    block_size: Optional[int] = None
    bits: Union[int, Literal["layer"]] = 8
    embeddings: bool = True
    n_centroids: Optional[int] = None
    n_iter: Optional[int] = None
    update_every: Optional[int] = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"QuantNoise: mode={self.mode!r}; expected one of {MODES}")
        p = self.p
        num = not isinstance(p, bool) and isinstance(p, (int, float)) and math.isfinite(p)
        if self.mode == "pq_exact" and not (num and 0 < p <= 1):
            raise ConfigError(f"QuantNoise: p={p!r} outside (0, 1] for mode 'pq_exact' (the fraction of "
                              "blocks replaced by their centroid at each training forward; 1: iPQ QAT)")
        if self.mode != "pq_exact" and not (num and 0 <= p < 1):
            raise ConfigError(f"QuantNoise: p={p!r} outside [0, 1) for mode {self.mode!r} (the fraction of "
                              "blocks dropped or of weights fake-quantized at each training forward; "
                              "p = 1 only with mode 'pq_exact')")
        object.__setattr__(self, "p", float(p))
        self._check_exact()
        bs = self.block_size
        if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
            raise ConfigError(f"QuantNoise: block_size={bs!r}; expected an integer >= 1 or None (per layer "
                              "type defaults: Linear/Embedding 8, Conv 1x1 4, Conv kxk the whole kernel)")
        if bs is not None and self.mode == "scalar":
            raise ConfigError(f"QuantNoise: block_size={bs} applies to modes 'pq' and 'pq_exact' only "
                              "(scalar noise picks single elements)")
        b = self.bits
        if b != "layer" and (isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS):
            raise ConfigError(f"QuantNoise: bits={b!r}; expected an integer in {MIN_BITS}..{MAX_BITS} or "
                              "'layer' (the bits of the layer's own weight quantizer)")
        if not isinstance(self.embeddings, bool):
            raise ConfigError(f"QuantNoise: embeddings={self.embeddings!r}; expected true or false")

    def _check_exact(self) -> None:
        from .kmeans import MAX_CENTROIDS
        lo = {"n_centroids": 2, "n_iter": 1, "update_every": 1}
        for key in EXACT_DEFAULTS:
            v = getattr(self, key)
            if v is None:
                continue
            if self.mode != "pq_exact":
                raise ConfigError(f"QuantNoise: {key}={v!r} applies to mode 'pq_exact' only (the codebook "
                                  "of exact PQ noise)")
            top = MAX_CENTROIDS if key == "n_centroids" else None
            if isinstance(v, bool) or not isinstance(v, int) or v < lo[key] or (top and v > top):
                raise ConfigError(f"QuantNoise: {key}={v!r}; expected an integer "
                                  + (f"in {lo[key]}..{top}" if top else f">= {lo[key]}"))

    def exact(self, key: str) -> int:
        """n_centroids / n_iter / update_every of mode "pq_exact", defaults resolved."""
        v = getattr(self, key)
        return EXACT_DEFAULTS[key] if v is None else v


__all__ = ["QuantNoise", "MODES", "EXACT_DEFAULTS"]
