"""Fold LSQ+'s activation offset into the bias for deployment (LSQ+ Sec. 3.2).

With x_hat = s * x_bar + beta and y = W_hat x_hat + b:
    y = W_hat (s * x_bar) + (b + beta * W_hat 1)
so the runtime feeds the offset-free input s * x_bar and uses the bias b' = b + beta * sum(W_hat)
over each output's fan-in. Exact for Linear and for convolutions without zero padding (a padded
position is 0 in x_hat, which is not an offset-free level); padded convs raise."""
from __future__ import annotations

import torch
from torch import nn

from ..attach import input_quantizer
from ..errors import ConfigError


@torch.no_grad()
def folded_bias(layer: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor | None:
    """Bias b + beta * W_hat 1 for a layer whose input quantizer has an offset (None without one).

    ``weight`` defaults to the layer's (fake-quantized) weight."""
    aq = input_quantizer(layer)
    offset = getattr(aq, "offset", None)
    if offset is None:
        return None
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        pads = layer.padding if isinstance(layer.padding, tuple) else (layer.padding,)
        if layer.padding == "same" or any(p != 0 for p in pads):
            raise ConfigError("the activation offset folds into the bias exactly only for "
                              "convolutions without zero padding")
    w = layer.weight if weight is None else weight
    bias = layer.bias if layer.bias is not None else torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
    if offset.numel() == 1:
        return bias + offset.reshape(()) * w.reshape(w.shape[0], -1).sum(dim=1)
    # one offset per input channel (a model input, quant/model_input.py): sum_c beta_c sum_k W[o, c, k]
    # over the channels c of output o's group
    groups = getattr(layer, "groups", 1)
    per_in = w.reshape(w.shape[0], w.shape[1], -1).sum(dim=2) if w.dim() > 2 else w   # (out, in / groups)
    beta = offset.reshape(groups, -1).to(w.dtype)                                      # (groups, in / groups)
    return bias + (per_in * beta.repeat_interleave(w.shape[0] // groups, dim=0)).sum(dim=1)
