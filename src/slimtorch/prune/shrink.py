"""``shrink_(model)``: physically remove pruned attention heads and FFN neurons, so the dense model
is smaller and faster with no sparse kernel (the structured route of movement pruning, Sanh, Wolf &
Rush 2020, papers.md Sec. 5c: "no significant improvement in inference speed" from unstructured
masks with standard PyTorch; head removal as HF's former ``prune_heads``).

For every head / neuron site (sites.py) whose layers carry a tied mask (``structure="heads"`` or
``"neurons"``), the kept groups are read from the mask, the masks are removed, and the Linears are
rebuilt with only the kept rows (q/k/v, first FFN Linear, their biases) and columns (output
projection, second FFN Linear). The attention then runs with fewer heads:
    nn.MultiheadAttention (split into q/k/v_proj, quant/mha.py): ``num_heads`` = kept heads; the
        attention core (quant/attention_core.py) takes the head count from the projections, so the
        module no longer needs embed_dim = num_heads * head_dim; bias_k / bias_v are sliced;
    HF BERT-style attention: ``num_attention_heads`` / ``all_head_size`` of the self-attention.
Outputs equal the masked model's (a pruned head or neuron only reached the output through the
zeroed columns of the output projection / second Linear), up to float summation order.

Shrink before quantizing: a layer with another weight transform (a quantizer) is refused."""
from __future__ import annotations

import torch
from torch import nn

from ..attach import raw_weight, remove_weight_transform, transform_input, weight_transforms
from ..cost import weight_mask
from ..errors import ConfigError
from .sites import head_sites, neuron_sites, unknown_attention, unknown_attention_error
from .structure import TIED


def _tied(m) -> bool:
    mk = weight_mask(m)
    return mk is not None and getattr(mk.config, "structure", None) in TIED


def _units(keep: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of the kept units (group g -> units g*size .. g*size+size-1)."""
    groups = keep.nonzero().reshape(-1)
    return (groups[:, None] * size + torch.arange(size, device=groups.device)).reshape(-1)


def _slice_linear(m: nn.Linear, dim: int, idx: torch.Tensor) -> None:
    w = m.weight.detach()
    m.weight = nn.Parameter(w.index_select(dim, idx.to(w.device)).clone(), requires_grad=m.weight.requires_grad)
    if dim == 0:
        if m.bias is not None:
            m.bias = nn.Parameter(m.bias.detach()[idx.to(w.device)].clone(), requires_grad=m.bias.requires_grad)
        m.out_features = len(idx)
    else:
        m.in_features = len(idx)


@torch.no_grad()
def shrink_(model: nn.Module) -> dict:
    """Remove the pruned heads and FFN neurons of ``model`` in place (see the module docstring).
    Returns {site: {"kind", "before", "after"}} (heads or neurons per site)."""
    sites = head_sites(model) + neuron_sites(model)
    plan = []
    for site in sites:
        mods = [model.get_submodule(n) for n in site.layers]
        tied = [_tied(m) for m in mods]
        if not any(tied):
            continue
        if not all(tied):
            missing = [n for n, t in zip(site.layers, tied) if not t]
            raise ConfigError(f"shrink_: {site.name!r}: layers {missing} have no {site.kind} mask while "
                              "the others of the block do; prune the block with one prune_ call")
        for n, m in zip(site.layers, mods):
            others = [type(t).__name__ for t in weight_transforms(m) if t is not weight_mask(m)]
            if others:
                raise ConfigError(f"shrink_: layer {n!r} also has {others}: shrink before quantize_ "
                                  "(the shrunk model is an ordinary float model)")
        mk = weight_mask(mods[0])
        keep = mk.group_mask(transform_input(mods[0], mk)).reshape(-1).clone()
        plan.append((site, mods, keep))
    covered = {n for site, _, _ in plan for n in site.layers}
    stray = [n for n, m in model.named_modules() if _tied(m) and n not in covered]
    if stray:
        owner = stray[0].rsplit(".", 1)[0] if "." in stray[0] else ""
        cls = type(model.get_submodule(owner)).__name__
        raise unknown_attention_error(owner, cls, f"shrink_: layer {stray[0]!r} has a head/neuron mask but")
    if not plan:
        unknown = unknown_attention(model, head_sites(model))
        if unknown:
            raise unknown_attention_error(*unknown[0], "shrink_")
        raise ConfigError("shrink_: no head or neuron masks in the model: prune it first with "
                          "structure='heads' or structure='neurons'")
    for site, mods, _ in plan:              # every mask read before any is removed (ties)
        for m in mods:
            remove_weight_transform(m, weight_mask(m))
    out = {}
    for site, mods, keep in plan:
        _apply(site, mods, keep)
        out[site.name] = {"kind": site.kind, "before": site.n, "after": int(keep.sum())}
    return out


def _apply(site, mods: list, keep: torch.Tensor) -> None:
    """Keep the groups ``keep`` (bool, one per head / neuron) of ``site``: slice its Linears, set the
    head count, and remember the kept groups (in the original numbering) on the owner module, for
    ``shrink_record`` / the packed file."""
    idx = _units(keep, site.size).to(raw_weight(mods[0]).device)
    for n, m in zip(site.layers, mods):
        _slice_linear(m, 0 if n in site.rows else 1, idx)
    kept = int(keep.sum())
    if site.style == "mha":
        a = site.owner
        a.num_heads = kept
        for b in ("bias_k", "bias_v"):
            t = getattr(a, b)
            if t is not None:
                setattr(a, b, nn.Parameter(t.detach()[..., idx].clone(), requires_grad=t.requires_grad))
    elif site.kind == "heads":
        s = site.owner.self
        s.num_attention_heads, s.all_head_size = kept, kept * site.size
    records = site.owner.__dict__.setdefault("_slim_shrunk", {})
    before = records.get(site.kind)                 # shrunk before: compose with its kept groups
    groups = keep.nonzero().reshape(-1).tolist()
    records[site.kind] = {"n": before["n"] if before else site.n,
                          "keep": [before["keep"][g] for g in groups] if before else groups}


def shrink_record(model: nn.Module) -> list:
    """[[owner, kind, n, kept groups], ...]: what ``shrink_`` removed from ``model`` (names relative
    to ``model``; groups numbered as in the unshrunk model of ``n`` groups). Stored in the packed file."""
    return [[name, kind, r["n"], list(r["keep"])] for name, m in model.named_modules()
            for kind, r in sorted(m.__dict__.get("_slim_shrunk", {}).items())]


@torch.no_grad()
def shrink_to_(model: nn.Module, record: list) -> None:
    """Shrink a freshly built (unshrunk) ``model`` as ``record`` (``shrink_record``) says, so a packed
    file of a shrunk model loads into the architecture's factory. Sites already at the recorded size
    with the same record are left alone; anything else that does not fit raises ConfigError."""
    from ..quant.mha import split_all_
    split_all_(model, {owner for owner, kind, *_ in record if kind == "heads"})   # MHA heads: q/k/v Linears
    sites = {(s.name, s.kind): s for s in head_sites(model) + neuron_sites(model)}
    for owner, kind, n, keep in record:
        site = sites.get((owner, kind))
        if site is None:
            raise ConfigError(f"shrunk {kind} of {owner!r}: the model has no such attention / FFN block")
        done = site.owner.__dict__.get("_slim_shrunk", {}).get(kind)
        if done == {"n": n, "keep": list(keep)}:
            continue
        if site.n != n or done is not None:
            raise ConfigError(f"shrunk {kind} of {owner!r}: recorded from {n} groups, the model has {site.n}")
        if not keep or len(set(keep)) != len(keep) or not all(0 <= g < n for g in keep):
            raise ConfigError(f"shrunk {kind} of {owner!r}: kept groups {keep[:8]} are not distinct indices < {n}")
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.tensor(sorted(keep))] = True
        _apply(site, [model.get_submodule(x) for x in site.layers], mask)


__all__ = ["shrink_", "shrink_record", "shrink_to_"]
