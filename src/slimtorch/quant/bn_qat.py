"""QAT with BatchNorm folded (Jacob et al. 2018, Sec. 3.2; Krishnamoorthi 2018, Sec. 3.2, Fig. 11;
the "approximate" form of PyTorch's ConvBn QAT modules).

The layer's weight and bias become parametrizations (attach.py) stacked BEFORE the quantizer, so
what is quantized is the folded weight, with sigma = sqrt(running_var + eps):

    W_fold = W * gamma / sigma              (FoldedWeight)
    b_fold = (b - running_mean) * gamma / sigma + beta                                 (FoldedBias)
    y      = conv(x, Q(W_fold)) + b_fold    (the layer: exactly what is deployed)

The BN's place holds :class:`BatchNormFold`. Frozen (``freeze_bn_stats``) or in eval mode it is the
identity, so the model computes the deployed function. Training before the freeze, it undoes the
scaling and applies the BN with batch statistics (which also updates the running statistics):

    z = (y - b_fold) * sigma / gamma + b = conv(x, Q(W_fold)) / (gamma / sigma) + b,   out = BN_batch(z)"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..attach import add_bias_transform, add_weight_transform, raw_param
from .bn_fold import ensure_bias, fold_scale


def _channel_shape(t: torch.Tensor, dim: int) -> tuple:
    return (-1,) + (1,) * (dim - 1)


class BatchNormFold(nn.Module):
    """Holds the folded BN (``bn``, its parameters and running statistics) and a plain reference
    to the layer it is folded into; see the module docstring for its forward."""

    cost_role = "fold"          # stored inside its layer (slimtorch.cost)

    def __init__(self, bn: _BatchNorm, layer: nn.Module):
        super().__init__()
        self.bn = bn
        self.__dict__["_layer"] = layer
        self.register_buffer("_frozen", torch.tensor(False))

    @property
    def layer(self):
        return self.__dict__["_layer"]

    @property
    def frozen(self) -> bool:
        return bool(self._frozen)

    def scale(self) -> torch.Tensor:
        """gamma / sqrt(running_var + eps), per output channel, in the BN's dtype."""
        return fold_scale(self.bn, self.bn.running_var.dtype)

    def folded_bias(self, b: torch.Tensor) -> torch.Tensor:
        beta = self.bn.bias if self.bn.affine else torch.zeros_like(b)
        return (b - self.bn.running_mean) * self.scale() + beta

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if not self.training or self.frozen:
            return y
        layer = self.layer
        shape = (1, -1) + (1,) * (y.dim() - 2)
        z = (y - layer.bias.reshape(shape)) / self.scale().reshape(shape) + raw_param(layer, "bias").reshape(shape)
        return self.bn(z)

    def extra_repr(self) -> str:
        return "frozen (running statistics)" if self.frozen else "batch statistics in training"


class _FoldTransform(nn.Module):
    def __init__(self, fold: BatchNormFold):
        super().__init__()
        self.__dict__["_fold"] = fold      # a plain reference: no submodule, no state_dict entry


class FoldedWeight(_FoldTransform):
    """W -> W * gamma / sqrt(running_var + eps) (per output channel)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.__dict__["_fold"].scale().reshape(_channel_shape(w, w.dim()))

    def extra_repr(self) -> str:
        return "W * gamma / sqrt(running_var + eps)"


class FoldedBias(_FoldTransform):
    """b -> (b - running_mean) * gamma / sqrt(running_var + eps) + beta."""

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return self.__dict__["_fold"].folded_bias(b)

    def extra_repr(self) -> str:
        return "(b - running_mean) * gamma / sqrt(running_var + eps) + beta"


def attach_train_fold(model: nn.Module, layer_name: str, bn_name: str):
    """Put the QAT fold on one (layer, bn) pair in place; returns a function that undoes it."""
    from torch.nn.utils import parametrize

    from .bn_fold import _set_module
    layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
    had_bias = layer.bias is not None
    ensure_bias(layer)
    fold = BatchNormFold(bn, layer)
    add_weight_transform(layer, FoldedWeight(fold))
    add_bias_transform(layer, FoldedBias(fold))
    _set_module(model, bn_name, fold)

    def undo():
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        parametrize.remove_parametrizations(layer, "bias", leave_parametrized=False)
        if not had_bias:
            layer.bias = None
        _set_module(model, bn_name, bn)
    return undo


def freeze_bn_stats(model: nn.Module, frozen: bool = True) -> int:
    """Stop using batch statistics in every train-time BN fold of ``model`` (``fold_batchnorm_(...,
    train=True)``): from now on training uses (and no longer updates) the running statistics, i.e.
    the deployed folded layer. ``frozen=False`` undoes it. Returns the number of folds changed."""
    folds = [m for m in model.modules() if isinstance(m, BatchNormFold)]
    for m in folds:
        m._frozen.fill_(frozen)
    return len(folds)
