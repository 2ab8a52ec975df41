"""Product-quantized layers in the ONNX export (``export_onnx``; Stock et al. 2020, papers.md Sec. 6a).

A codebook layer (pq/codebook.py: W = C[codes] reshaped) is exported as its codebook C (K x d,
float32 initializer), its codes (uint8 for K <= 256, int16 up to 2^15, as stored) and

    W = Reshape(Gather(C, Cast(codes, int64)), shape)      then MatMul / Conv / Gather as usual

so the file holds ~log2(K) / d bits per weight plus the codebook instead of 32 bits per weight.
onnxruntime's constant folding evaluates the Cast -> Gather -> Reshape once when the session is
built (all inputs are initializers), so it runs the layer at dense-weight speed from the small file;
W equals the fake-quant weight bit for bit, so outputs match PyTorch to float rounding.
The alternative, W as a dense initializer, is exact too but d * 32 / log2(K) times larger.
The exporter's own optimizer (onnxscript constant folding, inputs of at most 8192 elements and
outputs of at most 512 x 512) already folds the Gather of a small layer into a dense initializer,
where the difference is a few KiB; layers with more codes keep codebook + codes in the file.
A layer with an input quantizer gets its QuantizeLinear -> DequantizeLinear (onnx_export._Act) first."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attach import weight_transforms
from ..cost import cost_role, layer_kind, weight_codebook
from ..errors import ConfigError


def gather_weight(centroids: torch.Tensor, codes: torch.Tensor, shape) -> torch.Tensor:
    """W = C[codes] reshaped to ``shape`` (exported as Cast -> Gather -> Reshape)."""
    return centroids.index_select(0, codes.reshape(-1).to(torch.int64)).reshape(shape)


def stored_codes(codes: torch.Tensor, n_centroids: int) -> torch.Tensor:
    """The codes in the narrowest integer dtype ONNX's Cast reads: uint8 (K <= 256) or int16 / int32."""
    dt = torch.uint8 if n_centroids <= 256 else torch.int16 if n_centroids <= 1 << 15 else torch.int32
    return codes.reshape(-1).to(dt).clone()


class PQLayer(nn.Module):
    """Export stand-in for a product-quantized Linear / Conv1d / Conv2d / Embedding."""

    def __init__(self, m: nn.Module, act: nn.Module | None = None):
        super().__init__()
        cb = weight_codebook(m)
        if cb is None:
            raise ConfigError(f"export_onnx: {type(m).__name__} has no codebook")
        self.kind = layer_kind(m)
        if self.kind not in ("Linear", "Conv1d", "Conv2d", "Embedding"):
            raise ConfigError(f"export_onnx: cannot export a product-quantized {type(m).__name__}")
        self.shape = tuple(cb.shape)
        self.conv_args = ((m.stride, m.padding, m.dilation, m.groups) if self.kind.startswith("Conv")
                          else m.padding_idx if self.kind == "Embedding" else None)
        self.act = act
        self.register_buffer("codebook", cb.effective_centroids().detach().to(m.weight.dtype).clone())
        self.register_buffer("codes", stored_codes(cb.codes, cb.n_centroids))
        bias = getattr(m, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def weight(self) -> torch.Tensor:
        return gather_weight(self.codebook, self.codes, self.shape)

    def forward(self, x, *args, **kwargs):
        if self.kind == "Embedding":
            return F.embedding(x, self.weight(), self.conv_args)
        if self.act is not None:
            x = self.act(x)
        if self.kind == "Linear":
            y = torch.matmul(x, self.weight().t())
            return y + self.bias if self.bias is not None else y
        conv = F.conv1d if self.kind == "Conv1d" else F.conv2d
        return conv(x, self.weight(), self.bias, *self.conv_args)


def pq_exportable(m: nn.Module) -> bool:
    """Is the layer's weight C[codes] itself (a codebook with nothing after it but eval-time-off
    noise)? A scalar quantizer or mask after the codebook exports through onnx_export._QLayer."""
    cb = weight_codebook(m)
    if cb is None:
        return False
    chain = weight_transforms(m)
    return all(cost_role(t) == "noise" for t in chain[chain.index(cb) + 1:])


def pq_export_layers(model: nn.Module, quantized: set) -> list:
    """(name, module, None, None) of the product-quantized layers not among ``quantized`` (the names
    ``quantized_layers`` yields: those with a quantizer), as export_onnx's layer rows."""
    return [(n, m, None, None) for n, m in model.named_modules()
            if n not in quantized and weight_codebook(m) is not None]


__all__ = ["PQLayer", "gather_weight", "stored_codes", "pq_exportable", "pq_export_layers"]
