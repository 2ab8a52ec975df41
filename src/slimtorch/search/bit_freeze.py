"""When learned bits freeze (Uhlich et al. 2020, penalty method of Eq. 10), run by ``st.step(model)``.

The penalty lambda max(0, g)^2 is zero under the budget, so once met the task loss pushes the bits
back up and the size oscillates around the target. The rule below ends that:

* ``freeze_after`` = k: once every active target has been met for k consecutive ``step`` calls, every
  learned quantizer keeps its current bits (``freeze_bits_``: a one-element bit set; d / qmax keep
  learning on that fixed level range). The sizes are then constants: the budget stays met.
* ``freeze_at`` = n: at the n-th ``step`` call, if not frozen yet, freeze anyway; a weight target that
  is still exceeded is met by lowering bits greedily (each round the learned weight quantizer whose
  next lower allowed width saves the most bytes; a tied partner follows), so the run ends under it.
Both live on the model's :class:`MemoryBudget`; ``budget.frozen_at`` records the step."""
from __future__ import annotations

import torch
from torch import nn

from .. import cost as B


def _learned(q) -> bool:
    from ..quant.uhlich_params import UhlichBase
    return isinstance(q, UhlichBase)


def targets_met(model: nn.Module, budget) -> bool:
    """Every active target met at the current bits (sizes computed only for the active targets)."""
    active = [k for k, v in budget.targets.items() if v is not None]
    with torch.no_grad():
        sizes = budget.sizes(model, None, active)
    return all(k in sizes and float(sizes[k]) <= budget.targets[k] + 1e-9 for k in active)


def _lower(q) -> int | None:
    """Next allowed width below ``q.bits`` (its bit set, or bits - 1), or None at the smallest."""
    partner = q.__dict__.get("_partner")
    lo = max(q._bmin(), partner._bmin() if partner is not None else 0)
    below = [v for v in (q.__dict__.get("_orig_bit_set") or range(1, 9)) if lo <= v < q.bits]
    return max(below) if below else None


@torch.no_grad()
def project_weight_budget_(model: nn.Module, budget) -> list:
    """Lower frozen weight bits greedily until the weight target is met; returns [(layer, bits)]."""
    from ..quant.api import quantized_layers
    if budget.weight is None:
        return []
    u = {"B": 1.0, "kB": 1024.0}[budget.unit]
    changes = []
    while float(B.weight_bytes_tensor(model, budget.bias_bits)) / u > budget.weight + 1e-9:
        best = None
        for name, m, wq, _ in quantized_layers(model):
            if not _learned(wq):
                continue
            low = _lower(wq)
            if low is None:
                continue
            n = B.raw_weight(m).numel()
            saved = B.packed_bytes(n, wq.bits) - B.packed_bytes(n, low)
            if best is None or saved > best[0]:
                best = (saved, name, wq, low)
        if best is None:
            break
        _, name, wq, low = best
        for q in (wq, wq.__dict__.get("_partner")):
            if q is not None:
                q.bit_set = (low,)
        changes.append((name, low))
    return changes


def freeze_all_(model: nn.Module) -> dict:
    """``freeze_bits_`` keeping each quantizer's original bit set (for ``project_weight_budget_``)."""
    from .penalty import freeze_bits_
    for m in model.modules():
        if _learned(m) and "_orig_bit_set" not in m.__dict__:
            m.__dict__["_orig_bit_set"] = m.bit_set
    return freeze_bits_(model)


def after_step(model: nn.Module) -> None:
    """The freezing rule (module docstring); called by ``step(model)`` after each optimizer step."""
    from .penalty import get_budget
    b = get_budget(model)
    if b is None or b.frozen_at is not None or (b.freeze_after is None and b.freeze_at is None):
        return
    b.steps += 1
    b.met_steps = b.met_steps + 1 if targets_met(model, b) else 0
    if b.freeze_after is not None and b.met_steps >= b.freeze_after:
        freeze_all_(model)
        b.frozen_at = b.steps
    elif b.freeze_at is not None and b.steps >= b.freeze_at:
        freeze_all_(model)
        b.projected = project_weight_budget_(model, b)
        b.frozen_at = b.steps


def freeze_state(model: nn.Module) -> dict:
    """What the freezing rule changed, as plain data for a checkpoint (the trainer's ``extra_state``):
    the budget's step counters and every learned quantizer's bit sets, by module name."""
    from .penalty import get_budget
    b = get_budget(model)
    sets = {n: {"bit_set": list(q.bit_set) if q.bit_set else None,
                "orig": list(q.__dict__["_orig_bit_set"] or []) if "_orig_bit_set" in q.__dict__ else False}
            for n, q in model.named_modules() if _learned(q)}
    counters = None if b is None else {"steps": b.steps, "met_steps": b.met_steps, "frozen_at": b.frozen_at,
                                       "projected": [[n, int(v)] for n, v in b.projected]}
    return {"budget": counters, "quantizers": sets}


def load_freeze_state(model: nn.Module, state: dict) -> None:
    """Restore :func:`freeze_state` into ``model`` (same module names), so a resumed run continues
    with the same frozen bits and counters as the interrupted one."""
    from .penalty import get_budget
    mods = dict(model.named_modules())
    for n, s in (state.get("quantizers") or {}).items():
        q = mods.get(n)
        if q is None or not _learned(q):
            raise ValueError(f"freeze state names quantizer {n!r}, which the model does not have")
        q.bit_set = tuple(s["bit_set"]) if s["bit_set"] else None
        if s["orig"] is not False:
            q.__dict__["_orig_bit_set"] = tuple(s["orig"]) or None
    b, c = get_budget(model), state.get("budget")
    if b is not None and c is not None:
        b.steps, b.met_steps, b.frozen_at = c["steps"], c["met_steps"], c["frozen_at"]
        b.projected = [(n, v) for n, v in c["projected"]]


__all__ = ["after_step", "targets_met", "project_weight_budget_", "freeze_all_", "freeze_state",
           "load_freeze_state"]
