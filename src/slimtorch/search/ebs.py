"""EBS: efficient bitwidth search (Li et al. 2020, arXiv 2003.07577), the verbs for any training loop.

    ebs_(model, EBSConfig(budget="bitops", target_uniform=3), quant=st.LSQPlus(), example_input=x)
    opt = torch.optim.Adam(ebs_param_groups(model, lr=1e-3, strength_lr=1e-2))
    ... loss = task_loss + st.penalty(model); loss.backward(); opt.step()   # penalty adds the complexity loss
    result = ebs_select(model); remove_ebs_(model)
    st.quantize_(float_model, st.LSQPlus(), plan=result.plan)   # then retrain at the chosen bits

Every searched layer keeps ONE float meta weight; its quantized weight is sum_b p_b Q_b(W) with
p = softmax(alpha) over the candidate bits (search/ebs_mix.py), the same for its input activation with
its own strengths (or the same ones with ``tie_bits``). The complexity loss is

    E[cost] = base + sum_l p_w,l^T C_l p_a,l,     loss_c = multiplier * max(0, E[cost] / target - 1)

with C_l[w, a] the layer's exact integer cost at (w, a) as the cost module counts it (BitOps = MACs x w x a,
bytes = packed weight bytes, avg_bits = numel x w; hawq.CostModel), so E[cost] is the exact expectation of
the plan's cost under independent per-layer draws. Choices the paper does not fix (papers.md Sec. 4) are
documented on :class:`EBSConfig`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..attach import (add_weight_transform, find_layers, input_quantizer, remove_weight_transform,
                      set_input_quantizer, weight_transforms)
from ..config import register_config
from ..errors import ConfigError
from ..quant.api import lsq_input_quantizer, lsq_weight_quantizer, weight_quantizer
from ..quant.configs import LSQ, LSQPlus
from ..quant.quantizer import check_bits
from .ebs_mix import BitMixer
from ..cost import bitops, packed_bytes
from .hawq import CostModel, to_plan
from .penalty import register_penalty

BUDGETS = ("bitops", "bytes", "avg_bits")
FIRST_LAST = ("search", "float")
FITS = ("both", "down", "none")
STATE_ATTR = "_slimtorch_ebs"


@register_config("ebs")
@dataclass(frozen=True)
class EBSConfig:
    """bits / a_bits: candidate weight / activation bits (a_bits None: activations keep the quant
    config's fixed a_bits). tie_bits: one strength vector per layer for W and A (a layer's W and A bits
    equal). budget: bitops | bytes | avg_bits; the target is ``target`` (absolute, in the budget's unit)
    or, when it is None, the cost of every searched layer at ``target_uniform`` bits (W and A).
    multiplier: of the hinge complexity loss. temperature: p = softmax(alpha / T); ebs_search anneals T
    geometrically to ``temperature_final`` (default 0.1; None: T stays constant) over the steps after
    the warm-up, so the mixture hardens into the choice it will be retrained at and the constraint on
    E[cost] becomes one on the selected plan (benchmarks/RESULTS.md, "EBS, T = 1 (ablation)" rows).
    first_last: "search" (default: the first and last layers are searched like the rest) or "float"
    (the paper's setting: left out of the search and the plan, to stay float).
    fit: after the argmax, "down" lowers the bits of the least confident layers until the plan meets
    the target; "both" (default) then also raises bits, least confident first, while it still fits;
    "none" returns the bare argmax. Search loop (ebs_search): ``steps`` optimizer steps, the first
    ``warmup`` with the strengths frozen; Adam at ``lr`` (weights, steps) and ``strength_lr``;
    ``calib_batches`` batches initialise every candidate's range first.
    Not fixed by the paper (papers.md Sec. 4 NOT FOUND): the per-candidate quantizer (ours: the quant
    config's LSQ/LSQ+ quantizer), T annealed 1 -> 0.1, no Gumbel noise, the hinge form, warm-up and fitting."""
    bits: tuple[int, ...] = (2, 4, 8)
    a_bits: tuple[int, ...] | None = (2, 4, 8)
    tie_bits: bool = False
    budget: str = "bitops"
    target: float | None = None
    target_uniform: float | None = 4.0
    multiplier: float = 1.0
    temperature: float = 1.0
    temperature_final: float | None = 0.1
    first_last: str = "search"
    fit: str = "both"
    steps: int = 300
    warmup: int = 50
    lr: float = 1e-3
    strength_lr: float = 1e-2
    calib_batches: int = 4
    seed: int = 0
    include: str | tuple[str, ...] | None = None
    exclude: str | tuple[str, ...] | None = None

    def __post_init__(self):
        def need(ok, name, what):
            if not ok:
                raise ConfigError(f"EBSConfig.{name}={getattr(self, name)!r}: expected {what}")

        def bitset(name):
            v = getattr(self, name)
            need(isinstance(v, (tuple, list)) and len(v) > 0, name, "a non-empty list of bits, e.g. [2, 4, 8]")
            for b in v:
                check_bits(b, f"EBSConfig.{name}")
            object.__setattr__(self, name, tuple(sorted(set(v))))
        bitset("bits")
        if self.tie_bits:                  # one strength vector per layer: W and A share the bits
            object.__setattr__(self, "a_bits", self.bits)
        if self.a_bits is not None:
            bitset("a_bits")
        need(self.budget in BUDGETS, "budget", f"one of {BUDGETS}")
        for name in ("target", "target_uniform"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               and v > 0), name, "None or a number > 0")
        need(self.target is not None or self.target_uniform is not None, "target", "a number (or target_uniform)")
        need(self.temperature_final is None or (isinstance(self.temperature_final, (int, float))
                                                 and not isinstance(self.temperature_final, bool)
                                                 and math.isfinite(self.temperature_final)
                                                 and self.temperature_final > 0),
             "temperature_final", "None or a number > 0")
        for name in ("multiplier", "temperature", "lr", "strength_lr"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
                 name, "a number > 0")
        need(self.first_last in FIRST_LAST, "first_last", f"one of {FIRST_LAST}")
        need(self.fit in FITS, "fit", f"one of {FITS}")
        for name, lo in (("steps", 1), ("warmup", 0), ("calib_batches", 0), ("seed", 0)):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= lo, name, f"an integer >= {lo}")
        need(self.warmup < self.steps, "warmup", f"fewer than steps={self.steps}")


class EBSState:
    """What ``ebs_`` attached: the mixers per layer, the exact cost matrices and the target."""

    def __init__(self, cfg, names, mixers, cm: CostModel, options, limit, target_value, feasible):
        self.cfg, self.names, self.mixers, self.cm = cfg, names, mixers, cm
        self.options, self.limit, self.target_value, self.feasible = options, limit, target_value, feasible
        self._matrices: dict = {}

    def _dtype(self, device) -> torch.dtype:
        return torch.float32 if device.type == "mps" else torch.float64   # MPS has no float64

    def matrices(self, device) -> list:
        """The cost matrices on ``device`` (cached per device)."""
        key = str(device)
        if key not in self._matrices:
            self._matrices[key] = [torch.tensor(c, dtype=self._dtype(device), device=device) for c in self.cm.costs]
        return self._matrices[key]

    def joint_probs(self, i: int) -> torch.Tensor:
        """P(option k) of layer i: p_w(w) p_a(a) (untied), p(b) (tied), p_w(w) (activations fixed)."""
        wm, am = self.mixers[self.names[i]]
        dt = self._dtype(wm.strength.device)
        pw = wm.probs(dt)
        if self.cfg.tie_bits or am is None or not isinstance(am, BitMixer):
            return pw
        return (pw[:, None] * am.probs(dt)[None, :]).reshape(-1)

    def expected_cost(self) -> torch.Tensor:
        """E[cost] in the budget's unit (differentiable in every strength)."""
        device = next(iter(self.mixers.values()))[0].strength.device
        total = sum((self.joint_probs(i) * c).sum() for i, c in enumerate(self.matrices(device)))
        return self.cm.value(total)

    def complexity_loss(self) -> torch.Tensor:
        """multiplier * max(0, E[cost] / target - 1)."""
        ratio = self.expected_cost() / self.target_value
        return self.cfg.multiplier * torch.relu(ratio - 1.0)


def _options(cfg: EBSConfig, quant) -> list:
    if cfg.tie_bits:
        return [(b, b) for b in cfg.bits]
    if cfg.a_bits is not None:
        return [(w, a) for w in cfg.bits for a in cfg.a_bits]
    return [(w, quant.a_bits) for w in cfg.bits]


def _first_last(model, layers, example_input) -> list:
    if example_input is not None:
        from ..cost import trace_layers
        order = [n for n in trace_layers(model, example_input, names=set(layers))]
    else:
        order = list(layers)
    return list(dict.fromkeys([order[0], order[-1]])) if order else []


def searched_layers(model, cfg: EBSConfig, example_input=None) -> tuple[dict, list]:
    """(layers EBS searches, layers the paper's setting leaves float)."""
    layers = find_layers(model, cfg.include, cfg.exclude)
    if cfg.first_last == "search":
        return layers, []
    skip = _first_last(model, layers, example_input)
    kept = {n: m for n, m in layers.items() if n not in skip}
    if not kept:
        raise ConfigError("first_last='float' leaves no layer to search")
    return kept, skip


def cost_model(model, cfg: EBSConfig, quant, example_input=None):
    """(names, options, CostModel, limit, target value, feasible range) of the float model;
    ConfigError naming the feasible range when the target cannot be met."""
    check_quant(cfg, quant)
    layers, skip = searched_layers(model, cfg, example_input)
    names = list(layers)
    opts = _options(cfg, quant)
    # an embedding has no input activation: its options are its weight bits alone (untied search)
    options = {n: ([(w, None) for w in cfg.bits] if isinstance(layers[n], nn.Embedding) and not cfg.tie_bits
                   else opts) for n in names}
    exclude = [*([cfg.exclude] if isinstance(cfg.exclude, str) else (cfg.exclude or ())), *skip] or None
    cm = CostModel(model, names, options, cfg.budget, quant, cfg.include, exclude, example_input)
    if cfg.target is not None:
        target = float(cfg.target)
    else:
        t = cfg.target_uniform             # every searched layer at t bits, counted by the cost module
        if cfg.budget == "bitops":
            a = t if (cfg.a_bits is not None or cfg.tie_bits) else quant.a_bits
            target = float(bitops(cm.shapes, {n: (t, a) for n in names}))
        elif cfg.budget == "bytes":
            target = float(cm.base + sum(packed_bytes(cm.numel[n], t) for n in names))
        else:
            target = float(t)
    lo, hi = sum(min(c) for c in cm.costs), sum(max(c) for c in cm.costs)
    rng = (cm.value(lo), cm.value(hi))
    if cm.limit(target) < lo:
        raise ConfigError(f"EBS target {cfg.budget}={target:.6g} is infeasible with bits {cfg.bits}"
                          + (f" / a_bits {cfg.a_bits}" if cfg.a_bits else "")
                          + f": the feasible range is [{rng[0]:.6g}, {rng[1]:.6g}] {cfg.budget}")
    return names, options, cm, cm.limit(target), target, rng


def check_quant(cfg: EBSConfig, quant) -> None:
    """The plan's quantization config must be one EBS can build candidates from and apply as is."""
    if not isinstance(quant, LSQ) or quant.integer_offset:
        raise ConfigError("EBS candidates are LSQ/LSQ+ quantizers: pass quant=st.LSQ(...) or st.LSQPlus(...) "
                          f"without integer_offset (got {type(quant).__name__})")
    if quant.tie_bits and not cfg.tie_bits:
        raise ConfigError("the quant config ties W/A bits (quantize_ would raise each layer to max(w, a) and "
                          "miss the target): use EBSConfig(tie_bits=True) too")


def ebs_(model: nn.Module, config: EBSConfig | None = None, quant=None, example_input=None) -> EBSState:
    """Attach the search mixers in place (weights and inputs of every searched layer) and register
    the complexity loss with ``st.penalty``. ``quant``: the LSQ/LSQ+ config the plan will be used with
    (default LSQPlus()); it builds every candidate quantizer. BitOps budgets need ``example_input``."""
    cfg = config or EBSConfig()
    quant = quant if quant is not None else LSQPlus()
    if not isinstance(cfg, EBSConfig):
        raise ConfigError(f"config must be an EBSConfig, got {type(cfg).__name__}")
    check_quant(cfg, quant)
    if getattr(model, STATE_ATTR, None) is not None:
        raise ConfigError("EBS mixers are already attached to this model (remove_ebs_ first)")
    if cfg.budget == "bitops" and example_input is None:
        raise ConfigError("budget='bitops' needs example_input= (one batch of inputs) to count MACs")
    layers, _ = searched_layers(model, cfg, example_input)
    done = [n for n, m in layers.items() if weight_quantizer(m) is not None or input_quantizer(m) is not None]
    if done:
        raise ConfigError(f"run EBS on the float model, before quantize_: {done[:5]} are quantized")
    names, options, cm, limit, target, rng = cost_model(model, cfg, quant, example_input)
    mixers = {}
    for n in names:
        m = layers[n]
        wm = BitMixer(cfg.bits, lambda b, m=m: lsq_weight_quantizer(quant, m, b), "weight", cfg.temperature)
        wm.to(m.weight.device)
        add_weight_transform(m, wm)
        am = None
        if not isinstance(m, nn.Embedding):
            if cfg.tie_bits or cfg.a_bits is not None:
                am = BitMixer(cfg.a_bits or cfg.bits, lambda b, m=m: lsq_input_quantizer(quant, m, b),
                              "activation", cfg.temperature, shared=wm if cfg.tie_bits else None).to(m.weight.device)
                set_input_quantizer(m, am)
            elif quant.a_bits is not None:
                set_input_quantizer(m, lsq_input_quantizer(quant, m, quant.a_bits))
        mixers[n] = (wm, am)
    state = EBSState(cfg, names, mixers, cm, options, limit, target, rng)
    setattr(model, STATE_ATTR, state)
    return state


def ebs_state(model: nn.Module) -> EBSState:
    st = getattr(model, STATE_ATTR, None)
    if st is None:
        raise ConfigError("no EBS search is attached to this model: call ebs_(model, EBSConfig(...)) first")
    return st


@register_penalty
def _ebs_penalty(model: nn.Module):
    st = getattr(model, STATE_ATTR, None)
    return None if st is None else st.complexity_loss().float()


def ebs_param_groups(model: nn.Module, lr: float, strength_lr: float | None = None) -> list[dict]:
    """Optimizer groups: every parameter except the strengths at ``lr``; the strengths at
    ``strength_lr`` (default 10 x lr) without weight decay."""
    st = ebs_state(model)
    strengths = {id(wm.strength): wm.strength for wm, am in st.mixers.values()}
    strengths.update({id(am.strength): am.strength for _, am in st.mixers.values() if am is not None})
    rest = [p for p in model.parameters() if id(p) not in strengths]
    return [{"params": rest, "lr": lr},
            {"params": list(strengths.values()), "lr": strength_lr or 10 * lr, "weight_decay": 0.0}]


def remove_ebs_(model: nn.Module) -> nn.Module:
    """Take the mixers off (the trained meta weights stay as float weights)."""
    st = ebs_state(model)
    mods = dict(model.named_modules())
    for n in st.names:
        m = mods[n]
        for t in list(weight_transforms(m)):
            if isinstance(t, BitMixer):
                remove_weight_transform(m, t)
        if input_quantizer(m) is not None:
            del m._modules["input_quantizer"]
    delattr(model, STATE_ATTR)
    return model


def set_temperature(model: nn.Module, temperature: float) -> None:
    """Set T of every mixer (p = softmax(alpha / T)); for annealing in a user's own loop."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature={temperature!r}: expected a number > 0")
    for wm, am in ebs_state(model).mixers.values():
        for mix in (wm, am):
            if mix is not None:
                mix.temperature = float(temperature)


def temperature_at(cfg: EBSConfig, step: int) -> float:
    """T at ``step`` of ebs_search: constant through the warm-up, then geometric to temperature_final."""
    if cfg.temperature_final is None or step <= cfg.warmup:
        return cfg.temperature
    frac = (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup)
    return cfg.temperature * (cfg.temperature_final / cfg.temperature) ** min(frac, 1.0)


def plan_of(st: EBSState, choice: list) -> dict:
    """The quantize_ plan of option indices ``choice`` (a None activation keeps the config's)."""
    return to_plan({n: st.options[n][k] for n, k in zip(st.names, choice)})
