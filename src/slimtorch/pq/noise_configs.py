"""The Quant-Noise config (Fan, Stock et al., ICLR 2021, arXiv 2004.07320; papers.md Sec. 6): a frozen
dataclass registered as ``method: quant_noise`` (``config_from_dict`` / recipes rebuild it).

    p           the noise rate, in [0, 1): the fraction of blocks dropped (mode "pq") or of weights
                fake-quantized (mode "scalar") at each training forward
    mode        "pq": block dropping, W_used = W * (1 - M) / (1 - p), M ~ Bernoulli(p) per block
                (fairseq quant_noise.py, the proxy noise of product quantization);
                "scalar": intN noise, a fraction p of the elements replaced by their fake-quantized
                value, straight-through (fairseq IntLinear)
    block_size  mode "pq": elements per block, contiguous along the input features (None: fairseq's
                defaults per layer type: Linear / Embedding 8, Conv 1x1 4, Conv kxk the whole kh x kw
                kernel of each (out, in) pair; pq/noise.py ``block_size_for``)
    bits        mode "scalar": 2..8, or "layer": the bits of the layer's own weight quantizer (so the
                noise follows a HAWQ or Uhlich plan)
    embeddings  also noise nn.Embedding weights (fairseq applies Quant-Noise to embeddings)

fairseq's recommended rates: 0.05-0.2 for "pq" (block 8), 0.5 for "scalar"."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

from ..config import register_config
from ..errors import ConfigError
from ..quant.quantizer import MAX_BITS, MIN_BITS

MODES = ("pq", "scalar")


@register_config("quant_noise")
@dataclass(frozen=True)
class QuantNoise:
    """Quant-Noise (training-time weight noise; identity in eval). See the module docstring."""
    p: float = 0.1
    mode: Literal["pq", "scalar"] = "pq"
    block_size: Optional[int] = None
    bits: Union[int, Literal["layer"]] = 8
    embeddings: bool = True

    def __post_init__(self):
        p = self.p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 <= p < 1:
            raise ConfigError(f"QuantNoise: p={p!r} outside [0, 1) (the fraction of blocks dropped or of "
                              "weights fake-quantized at each training forward)")
        object.__setattr__(self, "p", float(p))
        if self.mode not in MODES:
            raise ConfigError(f"QuantNoise: mode={self.mode!r}; expected one of {MODES}")
        bs = self.block_size
        if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
            raise ConfigError(f"QuantNoise: block_size={bs!r}; expected an integer >= 1 or None (per layer "
                              "type defaults: Linear/Embedding 8, Conv 1x1 4, Conv kxk the whole kernel)")
        if bs is not None and self.mode != "pq":
            raise ConfigError(f"QuantNoise: block_size={bs} applies to mode='pq' only (scalar noise "
                              "picks single elements)")
        b = self.bits
        if b != "layer" and (isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS):
            raise ConfigError(f"QuantNoise: bits={b!r}; expected an integer in {MIN_BITS}..{MAX_BITS} or "
                              "'layer' (the bits of the layer's own weight quantizer)")
        if not isinstance(self.embeddings, bool):
            raise ConfigError(f"QuantNoise: embeddings={self.embeddings!r}; expected true or false")


__all__ = ["QuantNoise", "MODES"]
