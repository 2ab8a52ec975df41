"""Memory-budget penalties of Uhlich et al. (ICLR 2020, Eq. 8a-c, 10) and the training-loop verbs.

    loss = task_loss + penalty(model)            # sum_j lambda_j * max(0, g_j)^2
    loss.backward(); opt.step(); step(model)    # clip_quant_vals of the official code

g_1 = sum_l S^w_l - S^w_0 (total weight size), g_2 = sum_l S^x_l - S^x_0 (total activation size per
sample), g_3 = max_l S^x_l - S^x_0' (largest activation); sizes come from the learned bitwidths through
:mod:`slimtorch.cost` (differentiable: b(theta) with straight-through ceil/round), in bytes or
kB (1 kB = 1024 B, as the official code; lambda = 0.1 there). ``read_plan`` reads the learned plan.
Other methods add their own terms/steps with ``register_penalty`` / ``register_step``: pruning
(prune/api.py) advances its sparsity schedule in ``step`` and adds soft movement's L1 term to
``penalty``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from .. import cost as B

UNITS = {"B": 1.0, "kB": 1024.0}
BUDGET_ATTR = "_slimtorch_budget"
_PENALTIES: list[Callable] = []
_STEPS: list[Callable] = []


def register_penalty(fn: Callable):
    """Add ``fn(model) -> Tensor | None`` to what :func:`penalty` sums (e.g. L1 on mask scores)."""
    if fn not in _PENALTIES:
        _PENALTIES.append(fn)
    return fn


def register_step(fn: Callable):
    """Add ``fn(model)`` to what :func:`step` runs after each optimizer step."""
    if fn not in _STEPS:
        _STEPS.append(fn)
    return fn


def _learned(model):
    from ..quant.uhlich_params import UhlichBase
    return [m for m in model.modules() if isinstance(m, UhlichBase)]


def _snap_up(b: int, bit_set) -> int:
    return b if not bit_set else next((v for v in bit_set if v >= b), bit_set[-1])


def min_bits(q) -> int:
    """Smallest bitwidth quantizer ``q`` can reach: its b range (with tie and bit set) for learned
    bits, the current bits for fixed-bit quantizers, 32 for float."""
    if q is None:
        return B.FLOAT_BITS
    if not hasattr(q, "_bmin"):
        return q.bits
    b = q._bmin()
    partner = q.__dict__.get("_partner")
    if partner is not None:
        b = max(b, partner._bmin())
    return _snap_up(max(b, q.bits_floor), q.bit_set)


@dataclass
class MemoryBudget:
    """Targets (in ``unit``) for total weight size, total and largest per-sample activation size;
    None = unconstrained. ``lambdas`` = (weight, act_sum, act_max). ``bias_bits``: weight size as the
    paper's Table 2 (bias at the weight bits) instead of the packed file (bias float32).
    ``freeze_after`` / ``freeze_at``: when :func:`step` freezes the learned bits (bit_freeze.py)."""
    weight: float | None = None
    act_sum: float | None = None
    act_max: float | None = None
    unit: str = "kB"
    lambdas: tuple = (0.1, 0.1, 0.1)
    bias_bits: bool = False
    freeze_after: int | None = None
    freeze_at: int | None = None

    def __post_init__(self):
        for name in ("freeze_after", "freeze_at"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name}={v!r}: expected a number of steps >= 1 (or None)")
        self.steps, self.met_steps, self.frozen_at, self.projected = 0, 0, None, []
        if self.unit not in UNITS:
            raise ConfigError(f"unit={self.unit!r}; expected one of {sorted(UNITS)}")
        for name in ("weight", "act_sum", "act_max"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v) or v <= 0):
                raise ConfigError(f"budget {name}={v!r}: expected a number > 0 (or None)")
        lam = tuple(self.lambdas)
        if len(lam) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
                                for v in lam):
            raise ConfigError(f"lambdas={self.lambdas!r}: expected three numbers >= 0")
        self.lambdas = lam
        self._acts_checked = False
        self._shapes = None

    def trace(self, model: nn.Module, example_input) -> "MemoryBudget":
        """Record per-sample layer input sizes once (``trace_layers``) for models whose activation
        quantizers do not record them themselves (e.g. LSQ); used when no ``shapes`` are passed."""
        self._shapes = B.trace_layers(model, example_input)
        return self

    @property
    def targets(self) -> dict:
        return {"weight": self.weight, "act_sum": self.act_sum, "act_max": self.act_max}

    def sizes(self, model: nn.Module, shapes=None, which=("weight", "act_sum", "act_max")) -> dict:
        """Differentiable sizes in ``unit``: weight (Eq. 8a), act_sum (8b), act_max (8c)."""
        u = UNITS[self.unit]
        shapes = shapes if shapes is not None else self._shapes
        out = {}
        if "weight" in which:
            out["weight"] = B.weight_bytes_tensor(model, self.bias_bits) / u
        if "act_sum" in which or "act_max" in which:
            acts = list(B.activation_bytes_tensors(model, shapes).values())
            if acts:
                stacked = torch.stack(acts)
                out["act_sum"], out["act_max"] = stacked.sum() / u, stacked.max() / u
        return {k: v for k, v in out.items() if k in which}

    def __call__(self, model: nn.Module, shapes=None) -> torch.Tensor:
        """sum_j lambda_j max(0, size_j - target_j)^2 (Eq. 10); 0 when every size is under budget."""
        active = [k for k, v in self.targets.items() if v is not None]
        if not self._acts_checked and any(k != "weight" for k in active):
            self.check(model, shapes)
        sizes = self.sizes(model, shapes, active)
        lam = dict(zip(("weight", "act_sum", "act_max"), self.lambdas))
        total = torch.zeros((), dtype=torch.float64)
        for k in active:
            if k in sizes:
                total = total + lam[k] * torch.relu(sizes[k] - self.targets[k]) ** 2
        return total.to(_dtype(model))

    def feasible_minimum(self, model: nn.Module, shapes=None) -> dict:
        """Smallest sizes (in ``unit``) reachable with the smallest allowed bits of every layer."""
        from ..attach import input_quantizer
        from ..quant.api import weight_quantizer
        u = UNITS[self.unit]
        shapes = shapes if shapes is not None else self._shapes
        w = 0.0
        for m in B._quantizable(model):
            wq, aq = weight_quantizer(m), input_quantizer(m)
            n = B.raw_weight(m).numel()
            bias = getattr(m, "bias", None)
            nb = bias.numel() if bias is not None else 0
            bw = min_bits(wq)
            if self.bias_bits:
                w += math.ceil((n + nb) * bw / 8)
            else:
                qp = sum(q.num_qparam_values() for q in (wq, aq) if B.is_quantizer(q))
                w += math.ceil(n * bw / 8) + 4 * (nb + qp)
        out = {"weight": w / u}
        acts = []
        for name, _, aq in B.activation_layers(model):
            numel = shapes[name].in_numel if shapes is not None and name in shapes else \
                getattr(aq, "sample_numel", None)
            if numel is None:
                return out
            acts.append(math.ceil(numel * min_bits(aq) / 8) / u)
        if acts:
            out["act_sum"], out["act_max"] = sum(acts), max(acts)
        return out

    def check(self, model: nn.Module, shapes=None, activations: bool = True) -> None:
        """ConfigError when a target is below what the smallest allowed bits can reach."""
        feas = self.feasible_minimum(model, shapes)
        for k, t in self.targets.items():
            if t is None or (k != "weight" and not activations):
                continue
            if k not in feas:
                if k != "weight" and not B.activation_layers(model):
                    raise ConfigError(f"budget {k}={t} {self.unit}: the model has no quantized "
                                      "activations to constrain")
                continue
            if t < feas[k] * (1 - 1e-12):
                raise ConfigError(f"budget {k}={t:g} {self.unit} is below what the smallest allowed "
                                  f"bits can reach: the feasible minimum is {feas[k]:.4f} {self.unit}")
        if activations and all(k in feas for k in ("act_sum", "act_max")):
            self._acts_checked = True

    def status(self, model: nn.Module, shapes=None) -> dict:
        """Current sizes, targets and whether each is met (plain floats)."""
        with torch.no_grad():
            sizes = {k: float(v) for k, v in self.sizes(model, shapes).items()}
        return {k: {"size": sizes.get(k), "target": t,
                    "met": t is None or (k in sizes and sizes[k] <= t + 1e-9)}
                for k, t in self.targets.items()}

    def met(self, model: nn.Module, shapes=None) -> bool:
        return all(v["met"] for v in self.status(model, shapes).values())


def _dtype(model):
    p = next(model.parameters(), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def attach_budget(model: nn.Module, budget: MemoryBudget | None, clip_grads: bool | None = None):
    """Make ``budget`` the one :func:`penalty` uses for ``model`` (None removes it). ``clip_grads``
    switches the official gradient clipping of every learned-bit quantizer on/off."""
    if budget is not None and not isinstance(budget, MemoryBudget):
        raise ConfigError(f"attach_budget: expected a MemoryBudget, got {type(budget).__name__}")
    object.__setattr__(model, BUDGET_ATTR, budget)
    if clip_grads is not None:
        for q in _learned(model):
            q.clip_grads = bool(clip_grads)
    return model


def get_budget(model: nn.Module) -> MemoryBudget | None:
    return getattr(model, BUDGET_ATTR, None)


def penalty(model: nn.Module, budget: MemoryBudget | None = None, shapes=None) -> torch.Tensor:
    """Everything to add to the task loss: the model's (or the given) memory budget penalty plus the
    registered terms. A zero tensor when there is nothing to penalise."""
    b = budget if budget is not None else get_budget(model)
    total = b(model, shapes) if b is not None else None
    for fn in _PENALTIES:
        t = fn(model)
        if t is not None:
            total = t if total is None else total + t
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None, dtype=_dtype(model))
    return total


@torch.no_grad()
def clip_quant_values_(model: nn.Module) -> int:
    """Clip every learned quantizer parameter into its range (+/- 1e-5) and keep d < qmax,
    qmin < qmax (``clip_quant_vals`` of the official code). Returns how many quantizers were clipped."""
    qs = _learned(model)
    for q in qs:
        q.clip_values_()
    return len(qs)


def step(model: nn.Module) -> None:
    """Call after each optimizer step: the value clipping, the bit-freezing rule of the model's
    budget (``freeze_after`` / ``freeze_at``, bit_freeze.py) and the registered step functions."""
    from .bit_freeze import after_step
    clip_quant_values_(model)
    after_step(model)
    for fn in _STEPS:
        fn(model)


def set_grad_clip(model: nn.Module, on: bool = True) -> int:
    """Switch the gradient clipping of d/qmax to [-d, d] (qmin/qmax to [-qmin, qmin]) on or off."""
    qs = _learned(model)
    for q in qs:
        q.clip_grads = bool(on)
    return len(qs)


@torch.no_grad()
def freeze_bits_(model: nn.Module) -> dict:
    """Fix every learned quantizer at its current bits (a one-element bit set): the sizes become
    constants, the step sizes keep learning on the full level range of those bits. Use it once the
    budget is met to fine-tune without the bit flips of the penalty at the boundary. Returns the
    plan."""
    plan = read_plan(model)
    for q in _learned(model):
        q.bit_set = (q.bits,)
    return plan


def read_plan(model: nn.Module) -> dict:
    """The learned plan {layer: {"w_bits": int, "a_bits": int | None}} of every quantized layer
    (usable by export and by ``quantize_(model, cfg, plan=read_plan(model))``)."""
    from ..quant.api import quantized_layers
    return {name: {"w_bits": wq.bits if wq is not None else None,
                   "a_bits": aq.bits if aq is not None else None}
            for name, _, wq, aq in quantized_layers(model)}


__all__ = ["MemoryBudget", "penalty", "step", "clip_quant_values_", "read_plan", "freeze_bits_", "attach_budget",
           "get_budget", "set_grad_clip", "register_penalty", "register_step", "min_bits"]
