"""Quant-Noise (Fan, Stock et al., ICLR 2021; papers.md Sec. 6a) as a training-time weight transform.

    st.quant_noise_(model, st.QuantNoise(p=0.1))            # mode "pq": block dropping
    ... train ...                                            # the user's loop; identity in eval
    st.remove_quant_noise_(model)                            # before iPQ / export (weights untouched)

The transform is a parametrization of ``weight`` (attach.py), ``cost_role`` "noise": it stores
nothing and costs nothing (training only). In the chain it sits after pruning masks and before a
scalar quantizer, whichever order they are attached in: W' = Q(noise(W * M)).

Mode "pq_exact" (the selected blocks take their current k-means centroid, straight-through; p = 1
is iPQ quantization-aware training) is the subclass ExactPQNoise in noise_exact.py.

PQ noise (fairseq quant_noise.py): each output row of the weight, flattened over its input
features (Linear (out, in); Embedding (num, dim); Conv (out, in/groups * kh * kw), in memory
order), is cut into contiguous blocks of ``block_size``; one M_b ~ Bernoulli(p) per block, and

    W_used = W * (1 - M) / (1 - p)          E[W_used] = W,   dL/dW = dL/dW_used * (1 - M) / (1 - p).

Default blocks (``block_size_for``): Linear / Embedding 8, Conv 1x1 4 (along in_channels), Conv kxk
kh*kw (the whole kernel of one (out, in) pair, fairseq's conv rule), Conv1d alike.

Scalar noise (fairseq IntLinear, Eq. of Sec. 6a): M_ij ~ Bernoulli(p) per element and

    W_used = M * Q(W) + (1 - M) * W,        dL/dW = dL/dW_used  (straight-through, every element)

with Q our fake-quant core (quant/fake_quant.py): the grid of the layer's own weight quantizer
(its current step, levels and offset) when one is attached, initialised and at the noise's bits
(bits="layer": at the quantizer's bits, so a HAWQ / Uhlich plan sets each layer's noise; a layer
without a weight quantizer is float and gets no scalar noise); otherwise per-tensor min-max at
``bits`` with an integer zero point,
s = (max(W, 0) - min(W, 0)) / (2^N - 1), z = round(-min(W, 0) / s), levels [-z, 2^N - 1 - z], so
that 0 is on the grid (pruned weights stay exactly 0). No 1/(1-p) rescaling (fairseq neither).

Decisions where we differ from fairseq, on purpose:
- Functional: W_used is a new tensor; the stored weight is never written. fairseq assigns
  ``mod.weight.data = ...`` and so zeroes the dropped blocks for good (fairseq issues #3783, #3195).
- No clamp in scalar noise. fairseq computes clamp(W, lo, hi) + noise.detach() on every element,
  which alters the un-noised weights whenever its observer's range clips them (histogram observer)
  and stops their gradient there. Here the un-noised weights stay float (the paper: "unbiased
  gradients flow through the other weights"); with the min-max grid nothing is clipped anyway, and a
  learned quantizer's clipping (and its zero gradient outside the range) is applied by the quantizer
  itself, which sits right after the noise in the chain.
- Off in eval (identity). fairseq's scalar modules quantize fully in eval (p = 1); here that is the
  job of the real quantizer (``st.quantize_``), so evaluation, calibration and export see W.
- Random draws use torch's global generator: deterministic under ``torch.manual_seed``."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..attach import (QUANTIZABLE, add_weight_transform, find_layers, raw_weight, remove_weight_transform,
                      weight_transforms)
from ..config import handler_for, register_handler
from ..cost import cost_role, is_quantizer, weight_quantizer
from ..errors import ConfigError, PatternError
from ..quant.fake_quant import fake_quant
from .blocks import check_block_size, default_block_size
from ..distributed import check_same
from .noise_configs import QuantNoise

NOISY = QUANTIZABLE                                     # Conv1d, Conv2d, Linear, Embedding
EPS = 1e-12


def block_size_for(name: str, module: nn.Module, block_size: int | None = None) -> int:
    """The block of layer ``name``: ``block_size``, or fairseq's default for its type (blocks.py:
    Linear / Embedding 8, Conv 1x1 4, Conv kxk the whole kh*kw kernel): the same geometry as the
    codebooks, so the noise drops the blocks product quantization will share. ConfigError, naming
    the layer and the sizes that would divide, when it does not divide the row."""
    bs = default_block_size(module) if block_size is None else block_size
    try:
        check_block_size(name, module, raw_weight(module), bs)
    except ConfigError as e:
        raise ConfigError(f"QuantNoise: {e}") from None
    return bs


# -- the noise, as pure functions --------------------------------------------------------------

def pq_noise(x: torch.Tensor, p: float, block_size: int) -> torch.Tensor:
    """W * (1 - M) / (1 - p), M ~ Bernoulli(p) per block of ``block_size`` contiguous elements of
    each output row (x viewed as (out, -1, block_size))."""
    rows = x.shape[0]
    n_blocks = x[0].numel() // block_size
    keep = (torch.rand(rows, n_blocks, 1, device=x.device) >= p).to(x.dtype) * (1.0 / (1.0 - p))
    return (x.reshape(rows, n_blocks, block_size) * keep).reshape(x.shape)


@torch.no_grad()
def minmax_grid(x: torch.Tensor, bits: int) -> dict:
    """Per-tensor min-max grid at ``bits`` with an integer zero point (0 on the grid):
    s = (max(x, 0) - min(x, 0)) / (2^N - 1), z = round(-min(x, 0) / s), levels [-z, 2^N - 1 - z]."""
    top = 2 ** bits - 1
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    s = ((hi - lo) / top).clamp_min(EPS)
    z = torch.round(-lo / s).clamp(0, top)
    return {"scale": s, "q_n": -z, "q_p": top - z, "offset": None}


def scalar_noise(x: torch.Tensor, p: float, grid: dict) -> torch.Tensor:
    """M * Q(x) + (1 - M) * x with M ~ Bernoulli(p) per element, Q = ``fake_quant`` on ``grid``
    (scale, q_n, q_p, offset; no gradient to the grid); straight-through: dL/dx = dL/dout."""
    chosen = torch.rand(x.shape, device=x.device) < p
    with torch.no_grad():
        q = fake_quant(x.detach(), grid["scale"], grid["q_n"], grid["q_p"], grid["offset"])
    return torch.where(chosen, q + (x - x.detach()), x)      # exact Q(x) values, gradient 1


class QuantNoiseTransform(nn.Module):
    """The Quant-Noise weight transform of one layer (module docstring): ``forward(x)`` is the
    noisy weight in training mode and ``x`` itself in eval mode or at p = 0."""

    cost_role = "noise"

    def __init__(self, config: QuantNoise, block_size: int = 1, layer: str = "", owner: nn.Module | None = None):
        super().__init__()
        self.config, self.block_size, self.layer = config, block_size, layer
        object.__setattr__(self, "owner", owner)     # plain attribute: no cycle in the module tree
        self.quiet = False      # True: identity whatever the mode (while a chain is registered, attach.py)

    def grid(self, x: torch.Tensor) -> dict | None:
        """The scalar noise grid: the layer's weight quantizer's when it is attached, initialised
        and at these bits (always the case for bits="layer"), else min-max of ``x``. None for
        bits="layer" on a layer without a weight quantizer: a float layer, nothing to emulate."""
        wq = weight_quantizer(self.owner) if self.owner is not None else None
        bits = self.config.bits
        if bits == "layer":
            if wq is None:
                return None
            bits = wq.bits
        if wq is not None and wq.bits == bits and getattr(wq, "initialized", True):
            return wq.quant_params()
        return minmax_grid(x.detach(), int(bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.config.p
        if not self.training or p == 0 or self.quiet:
            return x
        if self.config.mode == "pq":
            return pq_noise(x, p, self.block_size)
        grid = self.grid(x)
        return x if grid is None else scalar_noise(x, p, grid)

    def extra_repr(self) -> str:
        c = self.config
        what = f"block_size={self.block_size}" if c.mode == "pq" else f"bits={c.bits}"
        return f"mode={c.mode}, p={c.p:g}, {what}"


# -- the verbs ---------------------------------------------------------------------------------

def is_noise(t) -> bool:
    return cost_role(t) == "noise"


def noise_transform(module: nn.Module) -> QuantNoiseTransform | None:
    return next((t for t in weight_transforms(module) if is_noise(t)), None)


def noisy_layers(model: nn.Module):
    """Yield (name, module, transform) for every layer with Quant-Noise attached."""
    for name, m in model.named_modules():
        t = noise_transform(m)
        if t is not None:
            yield name, m, t


def quant_noise_(model: nn.Module, config: QuantNoise, include=None, exclude=None) -> nn.Module:
    """Attach Quant-Noise of ``config`` in place to every Linear / Conv1d / Conv2d (and Embedding with
    ``config.embeddings``) matched by the include / exclude globs; all such layers by default. Every
    block size is checked before anything is attached. On a pruned and/or quantized layer the
    noise goes after the masks and before the quantizer (W' = Q(noise(W * M))). Returns ``model``."""
    if not isinstance(config, QuantNoise):
        raise ConfigError(f"quant_noise_: expected a QuantNoise config, got {type(config).__name__}")
    layers = find_layers(model, include, exclude, types=NOISY, what="quant-noise")
    if not config.embeddings:
        layers = {n: m for n, m in layers.items() if not isinstance(m, nn.Embedding)}
        if not layers:
            raise PatternError("quant_noise_: only Embedding layers selected, and embeddings=False")
    check_same({"config": repr(config), "layers": sorted(layers)}, "quant_noise_'s config and layers")
    handler_for(config)(model, config, layers)
    return model


@register_handler(QuantNoise)
def _attach(model, config: QuantNoise, layers: dict, *_):
    for name, m in layers.items():
        if noise_transform(m) is not None:
            raise ConfigError(f"layer {name!r} already has Quant-Noise (st.remove_quant_noise_ first)")
    sizes = {n: block_size_for(n, m, config.block_size) if config.mode != "scalar" else 1 for n, m in layers.items()}
    if config.mode == "pq_exact":
        from .noise_exact import ExactPQNoise
        for name, m in layers.items():
            t = ExactPQNoise(config, sizes[name], name, m)
            add_weight_transform(m, t, before=is_quantizer)
            t.fit()                        # k-means on what it receives (W, or W * M under a mask)
        return
    for name, m in layers.items():
        add_weight_transform(m, QuantNoiseTransform(config, sizes[name], name, m), before=is_quantizer)


def remove_quant_noise_(model: nn.Module) -> list[str]:
    """Detach every Quant-Noise transform (e.g. before iPQ or export); the stored weights (the same
    Parameter objects, so an optimizer keeps them) and the other transforms are left as they are.
    Returns the names of the layers it was removed from."""
    done = []
    for name, m, t in list(noisy_layers(model)):
        remove_weight_transform(m, t)
        done.append(name)
    return done


@contextlib.contextmanager
def noise_off(model: nn.Module):
    """Within the block every Quant-Noise transform of ``model`` is in eval mode (identity), whatever
    the model's mode; their modes are restored after (used by ``save_packed``)."""
    ts = [t for t in model.modules() if is_noise(t)]
    modes = [t.training for t in ts]
    try:
        for t in ts:
            t.training = False
        yield model
    finally:
        for t, mode in zip(ts, modes):
            t.training = mode


def float_noise_keys(model: nn.Module, state: dict, quantized: set) -> dict:
    """``state`` (a state dict of ``model``) without the buffers of Quant-Noise transforms, and with
    each unquantized layer whose only weight transforms are Quant-Noise stored as a plain
    ``<layer>.weight`` (noise stores nothing)."""
    out = dict(state)
    for name, m in model.named_modules():
        chain = weight_transforms(m)
        p = f"{name}." if name else ""
        for i, t in enumerate(chain):       # the codebook buffers of mode "pq_exact" (training state)
            if is_noise(t):
                for k in [k for k in out if k.startswith(f"{p}parametrizations.weight.{i}.")]:
                    del out[k]
        if name in quantized or not chain or not all(is_noise(t) for t in chain):
            continue
        out[p + "weight"] = out.pop(p + "parametrizations.weight.original")
    return out


__all__ = ["QuantNoise", "QuantNoiseTransform", "quant_noise_", "remove_quant_noise_", "noisy_layers",
           "noise_transform", "block_size_for", "pq_noise", "scalar_noise", "minmax_grid", "noise_off",
           "is_noise", "NOISY"]
