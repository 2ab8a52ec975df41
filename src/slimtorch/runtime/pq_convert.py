"""Product-quantized layers of a loaded packed model onto the inference kernels
(``load_packed(..., runtime="float" | "int8", pq_kernel=...)``; papers.md Sec. 6a, pq_lut.py).

Linear layers become ``PQLinear`` (centroids + codes + bias; LUT matmul or the dense rebuild,
``pq_kernel`` "auto" = measured per shape, pq_select.py); an input quantizer moves with the layer.
Conv1d / Conv2d / Embedding layers keep the dense rebuilt weight W = C[codes] ``load_packed``
already wrote (an Embedding lookup is then a gather of rebuilt rows). ``pq_kernel="off"`` leaves
every layer as the dense float module."""
from __future__ import annotations

import torch
from torch import nn

from ..attach import input_quantizer, set_input_quantizer
from ..errors import ConfigError
from .pq_lut import MODES, PQLinear

KERNELS = MODES + ("off",)


def check_pq_kernel(pq_kernel: str, pq_batch: int = 1) -> None:
    if pq_kernel not in KERNELS:
        raise ConfigError(f"pq_kernel={pq_kernel!r}; expected one of {KERNELS}")
    if not isinstance(pq_batch, int) or pq_batch < 1:
        raise ConfigError(f"pq_batch={pq_batch!r}; expected a positive int (input rows the kernel choice is timed at)")


@torch.no_grad()
def convert_pq(model: nn.Module, layers: dict, pq_kernel: str = "auto", pq_batch: int = 1) -> dict:
    """Swap every Linear in ``layers`` ({name: (centroids (K, d) float, codes)}) for a PQLinear in
    place; returns {name: kernel} of the layers converted ("lut" | "dense")."""
    check_pq_kernel(pq_kernel, pq_batch)
    done = {}
    if pq_kernel == "off":
        return done
    for name, (centroids, codes) in layers.items():
        m = model.get_submodule(name) if name else model
        if not name or not isinstance(m, nn.Linear):
            continue
        new = PQLinear(centroids.to(m.weight), codes, m.in_features, m.bias, mode=pq_kernel, batch=pq_batch)
        new.to(m.weight.device)
        aq = input_quantizer(m)
        if aq is not None:
            set_input_quantizer(new, aq)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        done[name] = new.kernel
    return done


__all__ = ["convert_pq", "check_pq_kernel", "KERNELS"]
