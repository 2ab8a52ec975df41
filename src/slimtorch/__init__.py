"""slimtorch: learned low-bit quantization, mixed precision, pruning and packed export for PyTorch."""
from .config import config_from_dict, config_to_dict, load_config, save_config
from .errors import CheckpointError, ConfigError, DataError, PatternError, SlimtorchError
from .quant import LSQ, LSQPlus, calibrate, quantize_, quantized_layers
from .report import report

__version__ = "0.1.0"

__all__ = ["LSQ", "LSQPlus", "calibrate", "quantize_", "quantized_layers", "report",
           "config_from_dict", "config_to_dict", "load_config", "save_config",
           "CheckpointError", "ConfigError", "DataError", "PatternError", "SlimtorchError"]
