"""EBS selection (Li et al. 2020, Fig. 1 "retraining stage"): the candidate with the largest strength
per layer, fitted to the cost target, returned as the plan HAWQ-V2 returns (``quantize_(plan=)``).

The argmax of independently learned strengths need not meet the target exactly. ``fit="down"`` lowers
the layer whose strength loses least per unit of cost saved, log P(k) - log P(k'), until the plan's
exact cost is <= the target; ``fit="both"`` then spends what is left of the budget the same way
upwards; ``fit="none"`` keeps the bare argmax (the paper's rule) even over the target.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .ebs import FITS, EBSState, ebs_state, plan_of


@dataclass
class EBSResult:
    """``plan`` feeds ``quantize_(model, quant, plan=plan)`` (``float_layers``: left float, exclude
    them). ``cost`` is the plan's exact cost as the cost module counts it (``limit``: the most allowed;
    ``value`` the same in the budget's unit); ``argmax_value``: the bare argmax plan's. ``probs``:
    {layer: {"w": {bits: p}, "a": {bits: p}}} at selection; ``history``: dicts of step, E[cost]
    ("expected"), task loss and the probabilities of every layer, ~50 times over the search."""
    plan: dict
    choice: dict
    probs: dict
    cost: int
    limit: int
    value: float
    argmax_value: float
    expected_value: float
    budget: str
    target: float
    feasible_range: tuple
    fit: str
    float_layers: list = field(default_factory=list)
    history: list = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()
                if k not in ("choice", "model")} | {"choice": {n: list(c) for n, c in self.choice.items()}}


def _logp(st: EBSState) -> list:
    with torch.no_grad():
        return [torch.log(st.joint_probs(i).clamp_min(1e-300)).tolist() for i in range(len(st.names))]


def fit_choice(costs: list, logp: list, limit: int, start: list, fit: str) -> list:
    """Greedy fit of option indices ``start`` to ``sum costs <= limit`` (see module docstring)."""
    ch = list(start)
    total = sum(c[k] for c, k in zip(costs, ch))
    if fit == "none":
        return ch

    def moves(up: bool):
        best = None
        for i, (c, lp) in enumerate(zip(costs, logp)):
            for k in range(len(c)):
                d = c[k] - c[ch[i]]
                if (d > 0) != up or d == 0 or (up and total + d > limit):
                    continue
                score = (lp[ch[i]] - lp[k]) / abs(d)     # strength lost per unit of cost moved
                if best is None or score < best[0] - 1e-15:
                    best = (score, i, k, d)
        return best
    while total > limit:
        m = moves(up=False)
        if m is None:
            raise ConfigError(f"no plan of these options costs <= {limit} (the cheapest costs "
                              f"{sum(min(c) for c in costs)})")
        score, i, k, d = m
        ch[i], total = k, total + d
    while fit == "both":
        m = moves(up=True)
        if m is None:
            break
        _, i, k, d = m
        ch[i], total = k, total + d
    return ch


def ebs_select(model, fit: str | None = None) -> EBSResult:
    """The plan of an attached EBS search (the model is not modified)."""
    st = ebs_state(model)
    fit = fit or st.cfg.fit
    if fit not in FITS:
        raise ConfigError(f"fit={fit!r}: expected one of {FITS}")
    costs = st.cm.costs
    logp = _logp(st)
    argmax = [max(range(len(lp)), key=lambda k: (lp[k], -k)) for lp in logp]
    ch = fit_choice(costs, logp, st.limit, argmax, fit)
    cost = sum(c[k] for c, k in zip(costs, ch))
    probs = {}
    with torch.no_grad():
        for n in st.names:
            wm, am = st.mixers[n]
            probs[n] = {"w": dict(zip(wm.candidate_bits, wm.probs().tolist()))}
            if am is not None:
                probs[n]["a"] = dict(zip(am.candidate_bits, am.probs().tolist()))
        expected = float(st.expected_cost())
    choice = {n: st.options[n][k] for n, k in zip(st.names, ch)}
    return EBSResult(plan_of(st, ch), choice, probs, cost + st.cm.base, st.limit + st.cm.base,
                     st.cm.value(cost), st.cm.value(sum(c[k] for c, k in zip(costs, argmax))), expected,
                     st.cfg.budget, st.target_value, st.feasible, fit)
