"""Integer bias: the bias an integer kernel adds to its int32 accumulator.

    b_hat = clamp(round(b / (s_x * s_w)), -2^31, 2^31 - 1) * (s_x * s_w)

with s_x the layer's input step and s_w its weight step (per output channel when per-channel).
Integer runtimes (onnxruntime's QLinearConv / QGemm, TFLite) store exactly this int32 bias
(Jacob et al. 2018, Sec. 2.4); training with it makes the float model and the integer kernels
agree (no code flips from a bias the runtime rounds on its own). The gradient passes straight
through to b; the steps are not trained through the bias."""
from __future__ import annotations

import torch
from torch import nn

from ..attach import input_quantizer

INT32 = (-(2 ** 31), 2 ** 31 - 1)


class Int32Bias(nn.Module):
    """Parametrization of a layer's ``bias`` (see the module docstring). It reads the layer's
    quantizers at every call, so it follows later changes (shared input quantizers, new bits).
    Before both quantizers are initialised (or while calibrating) the bias passes unchanged."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.__dict__["_owner"] = layer      # a plain reference: no submodule, no state_dict entry

    def step(self) -> torch.Tensor | None:
        from .api import weight_quantizer
        layer = self.__dict__["_owner"]
        aq, wq = input_quantizer(layer), weight_quantizer(layer)
        if aq is None or wq is None or getattr(aq, "observing", False) or not aq.initialized:
            return None
        try:
            pa, pw = aq.quant_params(), wq.quant_params()
        except Exception:
            return None
        if pa.get("kind", "uniform") != "uniform" or pw.get("kind", "uniform") != "uniform" \
                or pa["scale"].numel() != 1 or pw["offset"] is not None:
            return None
        return (pa["scale"].reshape(()) * pw["scale"].reshape(-1)).detach()

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        s = self.step()
        if s is None:
            return b
        s = s.to(b.dtype).expand(b.shape)
        b_hat = torch.round(b / s).clamp(*INT32) * s
        return b + (b_hat - b).detach()

    def extra_repr(self) -> str:
        return "int32 bias, step = s_x * s_w"


def attach_int32_bias(layer: nn.Module) -> bool:
    """Attach :class:`Int32Bias` to ``layer.bias`` (no-op when the layer has no bias)."""
    from ..attach import add_bias_transform, bias_transforms
    if getattr(layer, "bias", None) is None or any(isinstance(t, Int32Bias) for t in bias_transforms(layer)):
        return False
    add_bias_transform(layer, Int32Bias(layer))
    return True
