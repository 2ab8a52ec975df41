"""The product-quantization verbs: ``pq_`` attaches a Codebook (k-means on each layer's weight) in
place; ``ipq_stages`` quantizes layer groups one stage at a time with the user's fine-tuning in
between (iPQ, Fan et al. 2021 / Stock et al. 2020; fairseq ``quantization_utils.Quantizer``,
papers.md Sec. 6a): only the centroids and the not-yet-quantized weights train.

    for stage in st.ipq_stages(model, [["*fc1", "*fc2"], ["*embed*"], ["*attn*"]]):
        opt = torch.optim.Adam(st.pq_param_groups(model, lr=1e-4))     # rebuilt per stage
        fine_tune(model, opt)                                          # the user's own loop

Stacking: the codebook quantizes the weight as the transforms before it give it, W * M under a
pruning mask, and goes before a scalar quantizer as masks do (W' = Q(C[codes])). The transforms
before it are then frozen out (the codebook ignores its input's values), so finish pruning first.
``st.step`` has nothing to do for PQ (codes are fixed after k-means; centroids train by gradient)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

from ..attach import add_weight_transform, find_layers, raw_weight, transform_input
from ..config import handler_for, register_handler
from ..cost import cost_role, is_quantizer, weight_codebook, weight_quantizer
from ..errors import ConfigError
from .blocks import check_block_size
from .codebook import Codebook
from .configs import PQ
from ..distributed import check_same


def codebook_of(module: nn.Module) -> Codebook | None:
    """The Codebook weight transform of ``module``, or None (cost.weight_codebook)."""
    return weight_codebook(module)


def pq_layers(model: nn.Module):
    """Yield (name, module, codebook) for every product-quantized layer."""
    for name, m in model.named_modules():
        cb = codebook_of(m)
        if cb is not None:
            yield name, m, cb


def codebook_input(module: nn.Module) -> torch.Tensor:
    """The weight a codebook attached now receives: through the transforms before the first
    scalar quantizer (a mask: W * M), or through all of them when there is none."""
    wq = weight_quantizer(module)
    return transform_input(module, wq) if wq is not None else module.weight


def pq_(model: nn.Module, config: PQ | None = None, include=None, exclude=None, freeze: bool = True) -> nn.Module:
    """Product-quantize in place every Linear / Conv1d / Conv2d / Embedding matched by the include /
    exclude globs (all by default): k-means (``config.n_iter`` iterations, seeded) on its weight's
    sub-vectors, then a Codebook transform W' = C[codes]. Block sizes are checked for every layer
    before any is touched. ``freeze``: the stored float weights of the quantized layers stop
    training (``freeze_quantized_weights_``). Returns ``model``."""
    config = PQ() if config is None else config
    if not isinstance(config, PQ):
        raise ConfigError(f"pq_: expected a PQ config, got {type(config).__name__}")
    layers = find_layers(model, include, exclude, what="product-quantizable")
    for name, m in layers.items():
        if codebook_of(m) is not None:
            raise ConfigError(f"layer {name!r} is already product-quantized")
        check_block_size(name, m, raw_weight(m), config.block_size_for(m))
    check_same({"config": repr(config), "layers": sorted(layers)}, "pq_'s config and layers")
    handler_for(config)(model, config, layers, None)
    if freeze:
        freeze_quantized_weights_(model)
    return model


@register_handler(PQ)
@torch.no_grad()
def _apply_pq(model, config: PQ, layers: dict, _plan) -> None:
    for name, m in layers.items():
        w = codebook_input(m).detach()
        cb, _ = Codebook.fit(w, config.block_size_for(m), config.n_centroids, config.n_iter, config.seed,
                             config.int8_centroids, what=f"layer {name!r}")
        add_weight_transform(m, cb.to(w.device), before=is_quantizer)


def _used_elsewhere(model: nn.Module) -> set:
    """ids of parameters held by a module other than a codebook layer's parametrization list
    (e.g. an Embedding weight tied to an output Linear that is not product-quantized)."""
    used = set()
    for mod in model.modules():
        if isinstance(mod, ParametrizationList) and any(cost_role(t) == "codebook" for t in mod):
            continue
        used |= {id(p) for p in mod._parameters.values() if p is not None}
    return used


def freeze_quantized_weights_(model: nn.Module) -> list[str]:
    """``requires_grad=False`` on the stored float weight of every product-quantized layer (its
    forward reads the codebook only), except a weight another module still uses (tied). Returns the
    names of the layers whose weight was frozen."""
    used, out = _used_elsewhere(model), []
    for name, m, _ in pq_layers(model):
        w = raw_weight(m)
        if id(w) not in used and w.requires_grad:
            w.requires_grad_(False)
            out.append(name)
    return out


def pq_param_groups(model: nn.Module, lr: float, centroids_lr: float | None = None,
                    weight_decay: float | None = None) -> list[dict]:
    """Optimizer param groups for iPQ fine-tuning: every trainable parameter except the stored
    weights of product-quantized layers (unless tied elsewhere) at ``lr`` (and ``weight_decay``
    when given), then all centroids at ``centroids_lr`` (default ``lr``) without weight decay."""
    for v, what in ((lr, "lr"), (centroids_lr, "centroids_lr")):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not math.isfinite(v) or v <= 0):
            raise ConfigError(f"pq_param_groups: {what}={v!r}; expected a number > 0")
    used = _used_elsewhere(model)
    cents, skip = [], set()
    for _, m, cb in pq_layers(model):
        if cb.centroids.requires_grad and id(cb.centroids) not in skip:
            cents.append(cb.centroids)
        skip.add(id(cb.centroids))
        if id(raw_weight(m)) not in used:
            skip.add(id(raw_weight(m)))
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    first = {"params": rest, "lr": lr, **({"weight_decay": weight_decay} if weight_decay is not None else {})}
    groups = ([first] if rest else []) + ([{"params": cents, "lr": centroids_lr or lr, "weight_decay": 0.0}]
                                         if cents else [])
    if not groups:
        raise ConfigError("pq_param_groups: the model has no trainable parameters")
    return groups


@dataclass(frozen=True)
class IPQStage:
    index: int              # 0-based
    include: tuple          # the stage's patterns
    layers: tuple           # the layers this stage quantized
    config: PQ


def ipq_stages(model: nn.Module, stages, config: PQ | list | None = None, exclude=None):
    """Iterative PQ: a generator that, each time it is advanced, product-quantizes the next group
    of layers (``stages``: a list of glob patterns or pattern lists, e.g. fairseq's order FFN ->
    embeddings -> attention) with ``pq_`` (layers quantized earlier are left out) and yields an
    IPQStage; fine-tune between stages, rebuilding the optimizer (``pq_param_groups``).
    ``config``: one PQ for every stage or one per stage (e.g. block_size 4 for attention)."""
    if isinstance(stages, str) or not isinstance(stages, (list, tuple)) or not stages:
        raise ConfigError("ipq_stages: stages must be a non-empty list of glob patterns or pattern lists")
    configs = list(config) if isinstance(config, (list, tuple)) else [config or PQ()] * len(stages)
    if len(configs) != len(stages):
        raise ConfigError(f"ipq_stages: {len(configs)} configs for {len(stages)} stages")
    extra = [] if exclude is None else [exclude] if isinstance(exclude, str) else list(exclude)
    for i, (pats, cfg) in enumerate(zip(stages, configs)):
        pats = (pats,) if isinstance(pats, str) else tuple(pats)
        done = {n for n, _, _ in pq_layers(model)}
        pq_(model, cfg, include=list(pats), exclude=extra + sorted(done) or None)
        new = tuple(n for n, _, _ in pq_layers(model) if n not in done)
        yield IPQStage(i, pats, new, cfg or PQ())


__all__ = ["pq_", "pq_layers", "codebook_of", "codebook_input", "freeze_quantized_weights_",
           "pq_param_groups", "ipq_stages", "IPQStage"]
