"""Fake quantization: the shared core, quantizer modules, initialisers, configs and verbs."""
from .api import calibrate, quantize_, quantized_layers, weight_quantizer
from .configs import LSQ, LSQPlus, QuantConfig
from .fake_quant import dequantize, fake_quant, qrange, quantize_int, round_ste
from .quantizer import LSQQuantizer, Quantizer, build_quantizer, register_quantizer
from .adaround import adaround_
from .gptq import gptq_
from .bias_correction import bias_correct_
from .bn_fold import FoldResult, fold_batchnorm_
from .equalize import EqualizeResult, equalize_
from .bn_qat import freeze_bn_stats
from .bn_reestimate import reestimate_bn_
from .share import share_input_quantizers

__all__ = ["calibrate", "share_input_quantizers", "quantize_", "quantized_layers", "weight_quantizer", "LSQ", "LSQPlus",
           "QuantConfig", "dequantize", "fake_quant", "qrange", "quantize_int", "round_ste",
           "LSQQuantizer", "Quantizer", "build_quantizer", "register_quantizer", "fold_batchnorm_",
           "FoldResult", "EqualizeResult", "equalize_", "adaround_", "gptq_", "bias_correct_", "freeze_bn_stats", "reestimate_bn_"]
