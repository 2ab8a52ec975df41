"""Product quantization (Stock et al. 2020 "And the Bit Goes Down"; Fan et al. 2021 "Quant-Noise",
iPQ; papers.md Sec. 6): k-means on weight sub-vectors (``slimtorch.pq.kmeans.kmeans``), the Codebook weight
transform (centroid gradients averaged over assigned blocks, for every layer type), the ``pq_`` verb and iPQ
stages, and Quant-Noise as a training-time weight transform (noise.py)."""
from .api import (IPQStage, codebook_input, codebook_of, freeze_quantized_weights_, ipq_stages, pq_,
                  pq_layers, pq_param_groups)
from .blocks import KINDS, block_kind, check_block_size, default_block_size, from_blocks, to_blocks
from .codebook import Codebook
from .configs import PQ
from .kmeans import KMeansResult, code_bits, code_dtype
from .noise import (QuantNoiseTransform, block_size_for, minmax_grid, noise_off, noise_transform, noisy_layers,
                    pq_noise, quant_noise_, remove_quant_noise_, scalar_noise)
from .noise_configs import QuantNoise
from .noise_exact import ExactPQNoise, centroid_noise, exact_noise_layers, refresh_quant_noise_

__all__ = ["QuantNoise", "QuantNoiseTransform", "quant_noise_", "remove_quant_noise_", "noisy_layers",
           "noise_transform", "noise_off", "block_size_for", "pq_noise", "scalar_noise", "minmax_grid",
           "pq_", "pq_layers", "pq_param_groups", "freeze_quantized_weights_", "ipq_stages", "IPQStage",
           "codebook_of", "codebook_input", "Codebook", "PQ", "KINDS", "block_kind", "check_block_size",
           "default_block_size", "to_blocks", "from_blocks", "KMeansResult",
           "code_bits", "code_dtype", "ExactPQNoise", "centroid_noise", "exact_noise_layers",
           "refresh_quant_noise_"]
