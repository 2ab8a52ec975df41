"""slimtorch: learned low-bit quantization, mixed precision, pruning and packed export for PyTorch.

The verbs work inside any training loop:
    [fold_batchnorm_] -> [equalize_] -> quantize_ -> calibrate (GPTQ rounding at <= 4 bits) -> [adaround_] -> (loss + penalty(model)) -> step(model)
    -> [reestimate_bn_] -> report -> save_packed / load_packed
and pruning stacks with them on the same layers (W' = Q(W * M)):
    prune_ -> (loss [+ distill_loss] + penalty(model)) -> step(model) -> report [-> shrink_]
and Quant-Noise trains a model for (product) quantization (W' = Q(noise(W * M)), identity in eval):
    quant_noise_ -> (training) -> remove_quant_noise_
and EBS searches bits with one meta weight per layer, then the plan is retrained like HAWQ-V2's:
    ebs_ -> (loss + penalty(model), ebs_param_groups) -> ebs_select -> remove_ebs_ -> quantize_(plan=)
and product quantization replaces weights by codebooks, stage by stage (iPQ):
    for stage in ipq_stages(model, [ffn, embeddings, attention]): fine-tune(pq_param_groups(model, lr))
"""
from .config import config_from_dict, config_to_dict, load_config, save_config
from .errors import CheckpointError, ConfigError, DataError, PatternError, SlimtorchError
from .quant import LSQ, LSQPlus, calibrate, quantize_, quantized_layers, share_input_quantizers
from .quant import adaround_, gptq_, bias_correct_, equalize_, fold_batchnorm_, freeze_bn_stats, reestimate_bn_
from .quant.uhlich import Uhlich
from .quant.param_groups import quantizer_param_groups
from .quant.fake_quant_compiled import fast_fake_quant
from .report import report
from .prune import (HardMovement, Magnitude, SoftMovement, apply_masks_, prune_, prune_param_groups, pruned_layers,
                    shrink_, sparsity)
from .pq import QuantNoise, quant_noise_, remove_quant_noise_
from .distill import distill_loss, hidden_state_loss
from .search.penalty import MemoryBudget, freeze_bits_, penalty, read_plan, step
from .search.hawq import HAWQConfig, hawq_plan, hawq_search
from .search.hessian import hutchinson_traces
from .search.ebs import EBSConfig, ebs_, ebs_param_groups, remove_ebs_
from .search.ebs_select import ebs_select
from .search.ebs_search import ebs_plan, ebs_search
from .export import export_onnx, load_packed, save_packed
from .pq import PQ, ipq_stages, pq_, pq_layers, pq_param_groups
from .export.onnx_layernorm import unfuse_skip_layernorm_file

__version__ = "0.1.0"

__all__ = ["LSQ", "LSQPlus", "Uhlich", "calibrate", "quantize_", "quantized_layers", "share_input_quantizers", "report",
           "adaround_", "gptq_", "bias_correct_", "equalize_", "fold_batchnorm_", "freeze_bn_stats", "reestimate_bn_",
           "prune_", "Magnitude", "HardMovement", "SoftMovement", "prune_param_groups", "pruned_layers", "sparsity",
           "apply_masks_", "shrink_", "QuantNoise", "quant_noise_", "remove_quant_noise_", "distill_loss", "hidden_state_loss",
           "pq_", "PQ", "pq_layers", "pq_param_groups", "ipq_stages",
           "penalty", "step", "quantizer_param_groups", "fast_fake_quant", "read_plan", "freeze_bits_", "MemoryBudget", "HAWQConfig", "hawq_plan", "hawq_search",
           "EBSConfig", "ebs_", "ebs_param_groups", "remove_ebs_", "ebs_select", "ebs_search", "ebs_plan",
           "hutchinson_traces", "save_packed", "load_packed", "export_onnx", "unfuse_skip_layernorm_file",
           "config_from_dict", "config_to_dict", "load_config", "save_config",
           "CheckpointError", "ConfigError", "DataError", "PatternError", "SlimtorchError"]
