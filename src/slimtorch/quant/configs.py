"""LSQ and LSQ+ configs (papers.md Sec. 2). Validation names the field that is wrong."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import register_config
from ..errors import ConfigError
from .observers import check_percentile
from .quantizer import A_INITS, INITS, check_bits

GRANULARITIES = ("per_tensor", "per_channel")
ACT_MODES = ("auto", "signed", "unsigned", "offset")


@dataclass(frozen=True)
class QuantConfig:
    """Fields shared by every weight+activation quantization method.

    w_bits / a_bits: 2..8 (a_bits None = activations stay float).
    weights: per_tensor | per_channel.   tie_bits: a layer's W and A bits set to max(w, a).
    bias: "float" | "int32" (train with the int32 bias integer kernels add, step s_x * s_w:
    the float model then matches onnxruntime's QLinearConv/QGemm, see quant/bias.py).
    """
    w_bits: int = 4
    a_bits: int | None = 4
    weights: str = "per_tensor"      # LSQ / LSQ+ override: per_channel
    tie_bits: bool = False
    bias: str = "float"

    def __post_init__(self):
        check_bits(self.w_bits, "w_bits")
        if self.a_bits is not None:
            check_bits(self.a_bits, "a_bits")
        if self.weights not in GRANULARITIES:
            raise ConfigError(f"weights={self.weights!r}; expected one of {GRANULARITIES}")
        if self.bias not in ("float", "int32"):
            raise ConfigError(f"bias={self.bias!r}; expected 'float' or 'int32'")


@register_config("lsq")
@dataclass(frozen=True)
class LSQ(QuantConfig):
    """LSQ: learned step sizes; signed symmetric weights; activations signed or unsigned
    ("auto" decides from calibration data).

    Defaults are the best measured post-training ranges (issue 11, benchmarks/pretrained_ptq.py):
    weights per output channel with the MSE-optimal step (w_init="mse"), activations from the
    MSE-optimal clipping of a histogram accumulated over every calibration batch (a_init="mse_hist").
    The paper's inits stay available: LSQ w_init="lsq" / a_init="lsq" (s = 2<|v|>/sqrt(Q_P)),
    LSQ+ w_init="3sigma" / a_init="mse" (on samples), each with weights="per_tensor".
    a_init also takes the observers "minmax", "percentile" (at ``percentile``), "entropy".
    integer_offset (with activations="offset"): round the learned offset to a whole number of
    steps (an integer zero point), the grid integer kernels run without a float subtraction.
    model_input: "per_channel" (default) gives a convolution that reads the model's own input (a CNN's
    first conv reads the normalised image) one activation step (and offset) per channel, at the channel's
    min-max or MSE clipping, whichever errs less: with LSQ+'s offset at 8 bits that is the uint8 pixel
    grid, lossless (quant/model_input.py); "per_tensor" one for all. With
    bias="int32" or integer_offset (set for integer kernels, which take one input scale) model inputs
    stay per tensor."""
    activations: str = "auto"
    w_init: str = "mse"
    a_init: str = "mse_hist"
    grad_scale: bool = True
    integer_offset: bool = False
    percentile: float = 99.99
    weights: str = "per_channel"
    model_input: str = "per_channel"

    def __post_init__(self):
        super().__post_init__()
        if self.model_input not in GRANULARITIES:
            raise ConfigError(f"model_input={self.model_input!r}; expected one of {GRANULARITIES}")
        if self.activations not in ACT_MODES:
            raise ConfigError(f"activations={self.activations!r}; expected one of {ACT_MODES}")
        if self.integer_offset and self.activations != "offset":
            raise ConfigError(f"integer_offset=True needs activations='offset' (LSQ+), got "
                              f"activations={self.activations!r}")
        for name, ok in (("w_init", INITS), ("a_init", A_INITS)):
            if getattr(self, name) not in ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}; expected one of {ok}")
        check_percentile(self.percentile)


@register_config("lsq+")
@dataclass(frozen=True)
class LSQPlus(LSQ):
    """LSQ+: learned offset beta for activations (unsigned levels + beta). Same default inits as
    ``LSQ`` (the paper's: w_init="3sigma", a_init="mse", weights="per_tensor")."""
    activations: str = "offset"
