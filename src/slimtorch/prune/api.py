"""The pruning verbs: ``prune_`` attaches masks in place; ``st.step(model)`` advances their schedule
(registered below), ``st.penalty(model)`` adds soft movement's regulariser; ``prune_param_groups``
gives the scores their own learning rate; ``apply_masks_`` materialises W * M (the reference's
``bertarize.py``); ``pruned_layers`` / ``sparsity`` read the state.

    st.prune_(model, st.HardMovement(remaining=0.1, total_steps=T, warmup_steps=w))
    opt = torch.optim.AdamW(st.prune_param_groups(model, lr=3e-5))
    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + st.penalty(model)
        loss.backward(); opt.step(); opt.zero_grad(); st.step(model)
"""
from __future__ import annotations

import itertools
import math
import warnings

import torch
from torch import nn

from ..attach import add_weight_transform, find_layers, raw_param, remove_weight_transform, transform_input
from ..config import handler_for, register_handler
from ..cost import cost_role, weight_mask
from ..errors import ConfigError
from ..search.penalty import register_penalty, register_step
from .binarize import global_threshold
from .configs import PruneConfig, SoftMovement, TopKConfig
from .mask import Mask, SoftMovementMask, _ScoredMask, make_mask
from .sites import find_sites
from .structure import TIED, Grouping, grouping_for
from .schedule import cubic_value, regularization_lambda
from ..distributed import check_same

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
_GROUPS = itertools.count(1)


def pruned_layers(model: nn.Module):
    """Yield (name, module, mask) for every layer with a pruning mask."""
    for name, m in model.named_modules():
        mk = weight_mask(m)
        if mk is not None:
            yield name, m, mk


def prune_(model: nn.Module, config: PruneConfig, include=None, exclude=None) -> nn.Module:
    """Attach a mask of ``config`` (Magnitude / HardMovement / SoftMovement) in place to every
    Linear / Conv1d / Conv2d (and Embedding with ``config.embeddings``) matched by the include /
    exclude globs; all such layers by default. On a quantized layer the mask goes before the
    quantizer (W' = Q(W * M)); quantizing a pruned layer later stacks the same way. The layers of
    one call share one schedule (and, with ``scope="global"``, one threshold). Returns ``model``."""
    if not isinstance(config, PruneConfig):
        raise ConfigError(f"prune_: expected a pruning config (Magnitude, HardMovement, SoftMovement), "
                          f"got {type(config).__name__}")
    _warn_unreachable_tau(config)
    group = next(_GROUPS)
    if config.structure in TIED:
        _apply_tied(model, config, find_sites(model, config.structure, include, exclude), group)
    else:
        types = PRUNABLE + ((nn.Embedding,) if config.embeddings else ())
        layers = find_layers(model, include, exclude, types=types, what="prunable")
        _not_pruned(layers)
        check_same({"config": repr(config), "layers": sorted(layers)}, "prune_'s config and layers")
        handler_for(config)(model, config, layers, group)
    _recompute_global(model, force_group=group)
    return model


def _warn_unreachable_tau(config) -> None:
    """Soft movement drops a weight only when sigmoid(S) <= tau, i.e. once its score (initialised at 0)
    is below logit(tau); Adam moves a score by about ``scores_lr`` per step, so a run of
    ``total_steps`` cannot prune anything when total_steps * scores_lr < |logit(tau)|."""
    if not isinstance(config, SoftMovement) or not 0 < config.tau < 0.5:
        return
    need = math.log((1 - config.tau) / config.tau)
    reach = config.total_steps * config.scores_lr
    if reach < need:
        warnings.warn(f"SoftMovement: a weight is pruned once its score (starting at 0) falls below "
                      f"logit(tau={config.tau:g}) = {-need:.2f}, but with Adam a score moves about scores_lr="
                      f"{config.scores_lr:g} per step, at most ~{reach:.2f} in total_steps={config.total_steps}: "
                      f"likely nothing will be pruned; raise scores_lr (>= {need / config.total_steps:.2g}) or "
                      "total_steps", UserWarning, stacklevel=3)


def _not_pruned(layers: dict) -> None:
    for name, m in layers.items():
        if weight_mask(m) is not None:
            raise ConfigError(f"layer {name!r} is already pruned")


def _after_mask(t) -> bool:
    """The transforms a mask goes before: quantizers and Quant-Noise (W' = Q(noise(W * M)))."""
    return cost_role(t) in ("quantizer", "noise")


@register_handler(PruneConfig)
def _apply_masks(model, config: PruneConfig, layers: dict, group: int):
    for name, m in layers.items():
        w = raw_param(m, "weight").detach()
        mask = make_mask(config, w, group, grouping_for(config, name, w))
        add_weight_transform(m, mask, before=_after_mask)


def _apply_tied(model, config: PruneConfig, sites: list, group: int) -> None:
    """One mask per layer of each head / neuron site, all reading the first one's scores
    (structure.py); each lists the whole tie in ``members`` (magnitude sums over it)."""
    for site in sites:
        _not_pruned({n: model.get_submodule(n) for n in site.layers})
        tie, leader = [], None
        for names, axis in ((site.rows, 0), (site.cols, 1)):
            for n in names:
                m = model.get_submodule(n)
                w = raw_param(m, "weight").detach()
                g = Grouping("axis", axis, site.size)
                g.check(w.shape, f"layer {n!r} ({config.structure} of {site.name or 'the model'!r})")
                mk = make_mask(config, w, group, g, leader)
                leader = leader or mk
                add_weight_transform(m, mk, before=_after_mask)
                tie.append((m, mk))
        for _, mk in tie:
            mk.members[:] = tie


def _groups(model) -> dict:
    """{group id: [(module, mask), ...]} of the masks in ``model``."""
    out: dict = {}
    for _, m, mk in pruned_layers(model):
        out.setdefault(mk.group, []).append((m, mk))
    return out


@torch.no_grad()
def _recompute_global(model, force_group: int | None = None) -> None:
    """The global top-k threshold of each global-scope group: at ``prune_``, every ``global_every``
    steps (step % global_every == 0, as the reference) and at the last step of the schedule."""
    for group, entries in _groups(model).items():
        mk0 = entries[0][1]
        if not mk0.global_scope or (force_group is not None and group != force_group):
            continue
        step, cfg = int(mk0.step), mk0.config
        if not (force_group is not None or step % cfg.global_every == 0 or step == cfg.total_steps):
            continue
        thr = global_threshold([mk.importance(transform_input(m, mk)) for m, mk in entries if mk.tie_first],
                               float(mk0.value))
        for _, mk in entries:
            mk.threshold.fill_(thr)


@torch.no_grad()
def advance_(model: nn.Module) -> None:
    """One optimizer step of every mask's schedule: step += 1, value = the cubic schedule's v_step
    (schedule.py), then the global thresholds. Registered with ``st.step``."""
    masks = [mk for _, _, mk in pruned_layers(model)]
    for mk in masks:
        cfg = mk.config
        mk.step.add_(1)
        mk.value.fill_(cubic_value(int(mk.step), cfg.total_steps, cfg.initial_value(), cfg.final_value(),
                                   cfg.warmup_steps, cfg.initial_warmup, cfg.final_warmup))
    if masks:
        _recompute_global(model)


register_step(advance_)


def soft_penalty(model: nn.Module):
    """lambda_t * R per soft-movement group: R = mean over its layers of ||sigmoid(S_l)||_1 / numel_l,
    lambda_t = lam * tau_t / tau (the reference's ``regu_lambda * regu / counter``). None when the
    model has no soft-movement mask. Registered with ``st.penalty``."""
    total = None
    for entries in _groups(model).values():
        mk0 = entries[0][1]
        if not isinstance(mk0, SoftMovementMask):
            continue
        cfg: SoftMovement = mk0.config
        lam = regularization_lambda(float(mk0.value), cfg.final_value(), cfg.lam)
        reg = torch.stack([mk.regularizer() for _, mk in entries if mk.tie_first]).mean()
        term = lam * reg
        total = term if total is None else total + term
    return total


register_penalty(soft_penalty)


def prune_param_groups(model: nn.Module, lr: float, weight_decay: float | None = None,
                       base: list | None = None) -> list[dict]:
    """Optimizer param groups: every trainable parameter that is not a mask score at ``lr`` (and
    ``weight_decay`` when given), then the scores of each pruning config at its ``scores_lr``
    (1e-2 in the paper) with no weight decay. ``base``: groups built already (e.g.
    ``st.quantizer_param_groups(model, lr)``): the scores are taken out of them and appended."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"prune_param_groups: lr={lr!r}; expected a number > 0")
    by_lr: dict[float, list] = {}
    score_ids = set()
    for _, _, mk in pruned_layers(model):
        if isinstance(mk, _ScoredMask) and mk.tie_first and mk.scores.requires_grad \
                and id(mk.scores) not in score_ids:
            score_ids.add(id(mk.scores))
            by_lr.setdefault(float(mk.config.scores_lr), []).append(mk.scores)
    if base is not None:
        groups = []
        for g in base:
            params = [p for p in g["params"] if id(p) not in score_ids]
            if params:
                groups.append({**g, "params": params})
    else:
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in score_ids]
        first = {"params": rest, "lr": lr}
        if weight_decay is not None:
            first["weight_decay"] = weight_decay
        groups = [first] if rest else []
    groups += [{"params": ps, "lr": s_lr, "weight_decay": 0.0} for s_lr, ps in by_lr.items()]
    if not groups:
        raise ConfigError("prune_param_groups: the model has no trainable parameters")
    return groups


@torch.no_grad()
def layer_masks(model: nn.Module) -> dict:
    """{layer: bool mask now} of every pruned layer."""
    return {name: mk.mask_for(transform_input(m, mk)) for name, m, mk in pruned_layers(model)}


def sparsity(model: nn.Module) -> dict:
    """{"layers": {layer: fraction pruned}, "kept", "weights", "sparsity"} over the pruned layers."""
    per, kept, total = {}, 0, 0
    for name, mask in layer_masks(model).items():
        k = int(mask.sum())
        per[name] = 1 - k / mask.numel()
        kept, total = kept + k, total + mask.numel()
    return {"layers": per, "kept": kept, "weights": total, "sparsity": 1 - kept / total if total else 0.0}


@torch.no_grad()
def apply_masks_(model: nn.Module) -> dict:
    """Prune once for all (the reference's ``bertarize.py``): multiply each stored weight by its
    current mask and remove the mask (and its scores); quantizers stay and see the same W * M.
    Assumes the transforms before a mask are per-channel scalings (a BatchNorm fold) or none.
    Returns {layer: kept weights}. Training afterwards may regrow the zeroed weights."""
    out = {}
    todo = [(name, m, mk, mk.mask_for(transform_input(m, mk))) for name, m, mk in pruned_layers(model)]
    for name, m, mk, mask in todo:      # every mask first: tied masks read each other's layers
        raw_param(m, "weight").mul_(mask.to(raw_param(m, "weight").dtype))
        remove_weight_transform(m, mk)
        out[name] = int(mask.sum())
    return out


def masks_of(model: nn.Module) -> list[Mask]:
    return [mk for _, _, mk in pruned_layers(model)]


__all__ = ["prune_", "pruned_layers", "advance_", "soft_penalty", "prune_param_groups", "layer_masks",
           "sparsity", "apply_masks_", "masks_of", "PRUNABLE"]
