"""HAWQ-V2 mixed-precision allocation (Dong et al., NeurIPS 2020, arXiv 1911.03852).

Sensitivity Omega_i(b) = (Tr(H_i)/n_i) * ||Q_b(W_i) - W_i||^2 (Eq. 2.11) with our own quantizers,
plus (optionally) the activation term Tr(H_a)/n_a * ||Q_a(A) - A||^2 per sample. The plan minimises
sum_i Omega_i under a budget in average weight bits, bytes (as ``budget.model_costs`` counts them) or
BitOps (``budget.bitops``). Unlike HAWQ's / NNCF's monotone search, the optimum over the whole
candidate grid is exact: the Pareto frontier (cost, sum Omega) is built layer by layer with exact
integer costs and dominated points dropped (a DP whose states are the Pareto set), and the chosen
plan's cost is re-measured on a quantized copy. NNCF's monotone heuristic is kept for comparison.
``hawq_plan`` is a pure function: the model is not modified; its result feeds ``quantize_(plan=)``.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from ..attach import find_layers, raw_weight
from ..config import register_config
from ..errors import ConfigError
from ..quant.api import per_channel_shape, quantize_, weight_quantizer
from ..quant.configs import LSQPlus, QuantConfig
from ..quant.quantizer import INITS, LSQQuantizer, check_bits
from ..cost import FLOAT_BITS, bitops, layer_costs, model_costs, packed_bytes, trace_layers
from .hessian import FROZEN_MODES, collect_batches, default_loss, hutchinson_traces
from .pareto import Frontier, best_under, monotone_allocate, pareto_front  # noqa: F401

BUDGETS = ("avg_bits", "bytes", "bitops")
SEARCHES = ("exact", "monotone")
NEGATIVE = ("clamp", "abs", "keep")


@register_config("hawq")
@dataclass(frozen=True)
class HAWQConfig:
    """bits: candidate weight bits.  budget/target: avg_bits (mean weight bits over the planned
    layers), bytes (model bytes as budget.model_costs counts them) or bitops (budget.bitops per
    sample).  a_bits: candidate activation bits to allocate too (None: activations keep the quant
    config's a_bits).  tie_bits: one b per layer for W and A.  act_sensitivity: add the activation
    Omega (needed, and switched on, when a_bits are allocated untied).  search: exact | monotone.
    w_init/a_init/per_channel: the quantizer that measures ||Q_b(W) - W||^2.  negative: how a
    negative average trace enters Omega (clamp to 0, abs, keep).  frozen: see hutchinson_traces."""
    bits: tuple[int, ...] = (2, 4, 8)
    budget: str = "avg_bits"
    target: float = 4.0
    a_bits: tuple[int, ...] | None = None
    tie_bits: bool = False
    act_sensitivity: bool = False
    search: str = "exact"
    w_init: str = "minmax"
    a_init: str = "mse"
    per_channel: bool = False
    negative: str = "clamp"
    max_iter: int = 200
    tol: float = 1e-3
    patience: int = 1
    rel_stderr: float | None = None
    num_batches: int | None = 4
    seed: int = 0
    include: str | tuple[str, ...] | None = None
    exclude: str | tuple[str, ...] | None = None
    frozen: str = "skip"
    max_front: int = 200_000

    def __post_init__(self):
        def need(ok, name, what):
            if not ok:
                raise ConfigError(f"HAWQConfig.{name}={getattr(self, name)!r}: expected {what}")
        need(isinstance(self.bits, (tuple, list)) and len(self.bits) > 0, "bits", "a non-empty list")
        for b in self.bits:
            check_bits(b, "HAWQConfig.bits")
        object.__setattr__(self, "bits", tuple(sorted(set(self.bits))))
        if self.a_bits is not None:
            need(isinstance(self.a_bits, (tuple, list)) and len(self.a_bits) > 0, "a_bits", "None or a list")
            for b in self.a_bits:
                check_bits(b, "HAWQConfig.a_bits")
            object.__setattr__(self, "a_bits", tuple(sorted(set(self.a_bits))))
            need(not self.tie_bits, "a_bits", "None with tie_bits=True (tied layers use `bits`)")
        need(self.budget in BUDGETS, "budget", f"one of {BUDGETS}")
        need(isinstance(self.target, (int, float)) and not isinstance(self.target, bool)
             and math.isfinite(self.target) and self.target > 0, "target", "a number > 0")
        need(self.search in SEARCHES, "search", f"one of {SEARCHES}")
        need(self.w_init in INITS, "w_init", f"one of {INITS}")
        need(self.a_init in INITS, "a_init", f"one of {INITS}")
        need(self.negative in NEGATIVE, "negative", f"one of {NEGATIVE}")
        need(self.frozen in FROZEN_MODES, "frozen", f"one of {FROZEN_MODES}")
        need(isinstance(self.max_iter, int) and self.max_iter >= 1, "max_iter", "an integer >= 1")
        need(isinstance(self.tol, (int, float)) and math.isfinite(self.tol) and self.tol > 0, "tol", "> 0")
        need(isinstance(self.patience, int) and self.patience >= 1, "patience", "an integer >= 1")
        need(self.rel_stderr is None or 0 < self.rel_stderr < 1, "rel_stderr", "None or in (0, 1)")
        need(self.num_batches is None or (isinstance(self.num_batches, int) and self.num_batches >= 1),
             "num_batches", "None or an integer >= 1")
        need(isinstance(self.max_front, int) and self.max_front >= 100, "max_front", "an integer >= 100")
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
             "seed", "an integer >= 0")


# ---------------------------------------------------------------------- perturbations
@torch.no_grad()
def weight_perturbation(w: torch.Tensor, bits: int, init: str = "minmax", per_channel=False) -> float:
    """||Q_b(W) - W||^2 with an LSQQuantizer initialised on W by ``init``."""
    shape = per_channel_shape(w) if per_channel else (1,)
    q = LSQQuantizer(bits, "weight", signed=True, scale_shape=shape, init=init).to(w.device)
    w = w.detach().float()
    return float((q(w) - w).pow(2).sum())


@torch.no_grad()
def activation_perturbations(model, run, names, bits, init="mse", keep=1 << 16):
    """{layer: {a: mean over samples of ||Q_a(A) - A||^2}} for each layer's input A, seen while
    ``run(model)`` runs the model (eval mode) over the trace batches."""
    acts: dict[str, list] = {n: [] for n in names}
    mods = dict(model.named_modules())

    def hook(name):
        def f(mod, args):
            if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                acts[name].append(args[0].detach().float())
        return f
    hs = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        run(model)
    finally:
        for h in hs:
            h.remove()
        for m, t in modes.items():
            m.training = t
    out, gen = {}, torch.Generator().manual_seed(0)
    for n in names:
        if not acts[n]:
            out[n] = {a: 0.0 for a in bits}
            continue
        samples = sum(x.shape[0] if x.dim() > 1 else 1 for x in acts[n])
        flat = torch.cat([x.reshape(-1) for x in acts[n]])
        sub = flat[torch.randint(0, flat.numel(), (min(keep, flat.numel()),), generator=gen)]
        sub = torch.cat([sub, flat.min()[None], flat.max()[None]])
        out[n] = {}
        for a in bits:
            q = LSQQuantizer(a, "activation", signed=None, init=init)
            q.initialize(sub)
            out[n][a] = sum(float((q(x) - x).pow(2).sum()) for x in acts[n]) / samples
    return out


# ---------------------------------------------------------------------- costs
class CostModel:
    """Exact integer cost of each (layer, option) so that a plan's total equals what budget.py
    counts: cost(plan) = base + sum_i costs[i][option_i]. ``measure(plan)`` re-counts on a copy."""

    def __init__(self, model, names, options, budget, quant, include=None, exclude=None,
                 example_input=None):
        self.model, self.names, self.options, self.budget = model, names, options, budget
        self.quant, self.include, self.exclude = quant, include, exclude
        mods = dict(model.named_modules())
        self.numel = {n: raw_weight(mods[n]).numel() for n in names}
        self.total_numel = sum(self.numel.values())
        self.base = 0
        if budget == "avg_bits":
            self.costs = [[self.numel[n] * w for w, _ in options[n]] for n in names]
        elif budget == "bytes":
            self.costs = [[packed_bytes(self.numel[n], w) for w, _ in options[n]] for n in names]
            plan0 = {n: options[n][0] for n in names}
            self.base = self.measure(plan0) - sum(packed_bytes(self.numel[n], plan0[n][0]) for n in names)
        else:
            if example_input is None:
                raise ConfigError("budget='bitops' needs an example_input (or (x, y) batches)")
            self.shapes = trace_layers(model, example_input, names=set(names))
            macs = {n: self.shapes[n].macs if n in self.shapes else 0 for n in names}
            self.costs = [[macs[n] * w * (a or FLOAT_BITS) for w, a in options[n]] for n in names]
        if sum(max(c) for c in self.costs) + self.base >= 2 ** 62:
            raise ConfigError("costs overflow int64; use a coarser budget unit")

    def limit(self, target) -> int:
        t = Fraction(str(target))
        if self.budget == "avg_bits":
            return math.floor(t * self.total_numel)
        return math.floor(t) - self.base

    def value(self, cost):
        """Cost (without base) in the budget's unit: average bits, bytes or BitOps."""
        return (cost / self.total_numel) if self.budget == "avg_bits" else cost + self.base

    def measure(self, plan) -> int:
        """The plan's cost counted by budget.py on a quantized deep copy (base included)."""
        m = copy.deepcopy(self.model)
        quantize_(m, self.quant, include=self.include, exclude=self.exclude, plan=to_plan(plan))
        rows = {r.name: r for r in layer_costs(m)}
        if self.budget == "bytes":
            return model_costs(m)["bytes"]
        if self.budget == "avg_bits":
            return sum(rows[n].weight_numel * rows[n].w_bits for n in self.names)
        return bitops(self.shapes, {n: (rows[n].w_bits, rows[n].a_bits) for n in self.names})


def to_plan(choice: dict) -> dict:
    """{layer: (w, a)} -> {layer: {"w_bits": w[, "a_bits": a]}} (a None: keep the config's a_bits)."""
    return {n: ({"w_bits": w} if a is None else {"w_bits": w, "a_bits": a}) for n, (w, a) in choice.items()}


# ---------------------------------------------------------------------- the search
@dataclass
class HAWQResult:
    """``plan`` feeds ``quantize_(model, quant, include, exclude, plan=plan)``. ``cost`` is the
    plan's exact cost as budget.py counts it (``limit``: the most allowed), ``value`` the same in
    the budget's unit; ``omega[layer][k]`` is Omega of ``options[layer][k]``; ``front`` the whole
    Pareto frontier (see ``frontier_plan``); ``uniform``/``monotone``: reference plans."""
    plan: dict
    choice: dict
    options: dict
    omega: dict
    cost: int
    limit: int
    value: float
    omega_total: float
    budget: str
    target: float
    feasible_range: tuple
    front: Frontier
    frontier: list            # [(value, sum Omega)] ascending in cost
    uniform: dict             # bits -> {"value", "omega", "feasible", "plan"}
    monotone: dict | None     # NNCF heuristic: {"value", "omega", "plan"} (None: n/a or infeasible)
    traces: object
    exact: bool = True
    names: list = field(default_factory=list)

    def frontier_plan(self, i: int) -> dict:
        return to_plan({n: self.options[n][int(k)] for n, k in zip(self.names, self.front.choices[i])})

    def as_dict(self) -> dict:
        return {"plan": self.plan, "budget": self.budget, "target": self.target, "cost": self.cost,
                "value": self.value, "omega_total": self.omega_total, "exact": self.exact,
                "feasible_range": list(self.feasible_range), "frontier": self.frontier,
                "uniform": {str(b): {k: v for k, v in u.items() if k != "plan"} for b, u in self.uniform.items()},
                "monotone": None if self.monotone is None else {k: v for k, v in self.monotone.items() if k != "plan"},
                "omega": {n: {f"w{w}" + ("" if a is None else f"a{a}"): o for (w, a), o in
                              zip(self.options[n], self.omega[n])} for n in self.names},
                "traces": self.traces.as_dict()}


def _layer_options(cfg: HAWQConfig, frozen: bool):
    bits = cfg.bits[-1:] if frozen else cfg.bits
    if cfg.tie_bits:
        return [(b, b) for b in bits]
    if cfg.a_bits is not None:
        abits = cfg.a_bits[-1:] if frozen else cfg.a_bits
        return [(w, a) for w in bits for a in abits]
    return [(w, None) for w in bits]


def _feasible(model, names, options, cfg: HAWQConfig, quant, example_input):
    """The cost model of the bit grid and its feasible range; ConfigError if the target is below it."""
    cm_opts = {n: [(w, a if a is not None else quant.a_bits) for w, a in options[n]] for n in names}
    cm = CostModel(model, names, cm_opts, cfg.budget, quant, cfg.include, cfg.exclude, example_input)
    limit = cm.limit(cfg.target)
    lo, hi = sum(min(c) for c in cm.costs), sum(max(c) for c in cm.costs)
    rng = (cm.value(lo), cm.value(hi))
    if limit < lo:
        raise ConfigError(f"budget {cfg.budget}={cfg.target} is infeasible with bits {cfg.bits}: the "
                          f"feasible range is [{rng[0]:.6g}, {rng[1]:.6g}] {cfg.budget}")
    return cm, cm_opts, limit, rng


def check_budget(model, config: HAWQConfig, quant=None, example_input=None) -> tuple:
    """Before any trace is computed: the feasible range of ``config.budget`` over the bit grid
    (every layer trainable); ConfigError naming the range when ``config.target`` cannot be met."""
    quant = quant if quant is not None else LSQPlus()
    names = list(find_layers(model, config.include, config.exclude))
    options = {n: _layer_options(config, False) for n in names}
    return _feasible(model, names, options, config, quant, example_input)[3]


def _effective(t: float, mode: str) -> float:
    return max(t, 0.0) if mode == "clamp" else abs(t) if mode == "abs" else t


def hawq_search(model, data, config: HAWQConfig | None = None, *, loss_fn=None, quant=None,
                example_input=None, traces=None, progress: bool = True) -> HAWQResult:
    """Hutchinson traces (or the given ``traces``), Omega per (layer, bits), and the least-Omega
    plan under ``config.budget <= config.target``. ``quant`` is the config the plan will be used with
    (default LSQPlus()): it fixes the byte accounting and the activation bits when not allocated."""
    cfg = config or HAWQConfig()
    quant = quant if quant is not None else LSQPlus()
    if not isinstance(cfg, HAWQConfig) or not isinstance(quant, QuantConfig):
        raise ConfigError("config must be a HAWQConfig and quant a quantization config (e.g. LSQPlus())")
    if getattr(quant, "tie_bits", False) and not cfg.tie_bits:
        raise ConfigError("the quant config ties W/A bits: use HAWQConfig(tie_bits=True) too")
    layers = find_layers(model, cfg.include, cfg.exclude)
    done = [n for n, m in layers.items() if weight_quantizer(m) is not None]
    if done:
        raise ConfigError(f"run HAWQ on the float model, before quantize_: {done[:5]} are quantized")
    need_act = cfg.act_sensitivity or (cfg.a_bits is not None)
    loss_fn = loss_fn or default_loss
    closure = callable(data) and not hasattr(data, "__iter__")
    batches = None if closure else collect_batches(data, cfg.num_batches)
    if traces is None:
        traces = hutchinson_traces(model, data if closure else batches, loss_fn, include=cfg.include,
                                   exclude=cfg.exclude, max_iter=cfg.max_iter, tol=cfg.tol,
                                   patience=cfg.patience, rel_stderr=cfg.rel_stderr, num_batches=None, activations=need_act, frozen=cfg.frozen,
                                   seed=cfg.seed, progress=progress)
    elif need_act and traces.act_traces is None:
        raise ConfigError("activation sensitivity needs traces computed with activations=True")
    names = list(layers)
    missing = [n for n in names if n not in traces.traces and n not in traces.frozen]
    if missing:
        raise ConfigError(f"no Hessian trace for layers {missing[:5]}")
    options = {n: _layer_options(cfg, n not in traces.traces) for n in names}
    if cfg.budget == "bitops" and example_input is None:
        if closure or not isinstance(batches[0], (list, tuple)):
            raise ConfigError("budget='bitops' needs example_input= for closures and dict batches")
        example_input = batches[0][0]

    def run(m):
        with torch.no_grad():
            if closure:
                data(m)
            else:
                for b in batches:
                    loss_fn(m, b)
    traced = [n for n in names if n in traces.traces]
    a_set = sorted({a if a is not None else quant.a_bits for n in traced for _, a in options[n]} - {None})
    act = activation_perturbations(model, run, traced, a_set, cfg.a_init) if need_act and a_set else {}
    omega = {}
    for n in names:
        if n not in traces.traces:
            omega[n] = [0.0] * len(options[n])
            continue
        w = raw_weight(layers[n])
        tw = _effective(traces.traces[n], cfg.negative)
        pw = {b: weight_perturbation(w, b, cfg.w_init, cfg.per_channel) for b in {o[0] for o in options[n]}}
        ta = _effective(traces.act_traces[n], cfg.negative) if n in act else 0.0
        omega[n] = [tw * pw[wb] + (ta * act[n][a if a is not None else quant.a_bits] if ta else 0.0)
                    for wb, a in options[n]]
    neg = [n for n, t in traces.traces.items() if t < 0]
    if neg and cfg.negative != "keep":
        warnings.warn(f"negative average Hessian trace (non-convex point) for {neg[:5]}: "
                      f"handled by negative={cfg.negative!r}", stacklevel=2)

    cm, cm_opts, limit, rng = _feasible(model, names, options, cfg, quant, example_input)
    om = [omega[n] for n in names]
    front = pareto_front(cm.costs, om, cfg.max_front)
    i = best_under(front, limit)
    ch, cost, tot = list(front.choices[i]), int(front.costs[i]), float(front.omegas[i])
    order = sorted(range(len(names)), key=lambda j: traces.traces.get(names[j], math.inf))
    mono = None
    if cfg.a_bits is None:
        try:
            r = monotone_allocate(order, cm.costs, om, limit)
        except ConfigError:   # too many sequences: no comparison point unless it was asked for
            if cfg.search == "monotone":
                raise
            r = None
        if r is not None:
            mono = {"value": cm.value(r[1]), "omega": r[2],
                    "plan": to_plan({n: options[n][k] for n, k in zip(names, r[0])})}
            if cfg.search == "monotone":
                ch, cost, tot = r
    elif cfg.search == "monotone":
        raise ConfigError("search='monotone' needs one bit choice per layer (no untied a_bits)")
    choice = {n: options[n][k] for n, k in zip(names, ch)}
    plan = to_plan(choice)
    measured = cm.measure(cm_plan := {n: cm_opts[n][k] for n, k in zip(names, ch)})
    if measured != cost + cm.base or cost > limit:
        raise RuntimeError(f"internal: predicted cost {cost + cm.base} != measured {measured} ({cm_plan})")
    uniform = {}
    for b in cfg.bits:
        ks = [min(range(len(options[n])), key=lambda k: (abs(options[n][k][0] - b),
                                                         abs((options[n][k][1] or b) - b))) for n in names]
        c = sum(cm.costs[j][k] for j, k in enumerate(ks))
        uniform[b] = {"value": cm.value(c), "omega": sum(om[j][k] for j, k in enumerate(ks)),
                      "feasible": c <= limit, "plan": to_plan({n: options[n][k] for n, k in zip(names, ks)})}
    return HAWQResult(plan, choice, options, omega, measured, limit + cm.base, cm.value(cost), tot,
                      cfg.budget, cfg.target, rng, front,
                      [(cm.value(int(c)), float(o)) for c, o in zip(front.costs, front.omegas)],
                      uniform, mono, traces, front.exact, names)


def hawq_plan(model, data, config: HAWQConfig | None = None, **kwargs) -> dict:
    """The HAWQ-V2 plan {layer: {"w_bits": b[, "a_bits": a]}} (see :func:`hawq_search`)."""
    return hawq_search(model, data, config, **kwargs).plan
