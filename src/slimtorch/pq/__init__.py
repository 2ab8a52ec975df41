"""Product quantization: Quant-Noise (Fan, Stock et al. 2021) as a training-time weight transform."""
from .noise import (QuantNoiseTransform, block_size_for, minmax_grid, noise_off, noise_transform, noisy_layers,
                    pq_noise, quant_noise_, remove_quant_noise_, scalar_noise)
from .noise_configs import QuantNoise

__all__ = ["QuantNoise", "QuantNoiseTransform", "quant_noise_", "remove_quant_noise_", "noisy_layers",
           "noise_transform", "noise_off", "block_size_for", "pq_noise", "scalar_noise", "minmax_grid"]
