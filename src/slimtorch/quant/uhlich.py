"""Learned mixed precision of Uhlich et al., "Mixed Precision DNNs: All you need is a good
parametrization" (ICLR 2020): the uniform quantizer with parametrizations U1 (b, d), U2 (b, qmax),
U3 (d, qmax), the ``Uhlich`` config (method "uhlich") and its handler. The power-of-two quantizer
(P1-P3) is in :mod:`slimtorch.quant.pow2`; budgets and penalties in :mod:`slimtorch.search.penalty`.

Uniform symmetric quantizer (Eq. 1), b including the sign bit:
    Q(x) = sign(x) d floor(|x|/d + 1/2)  for |x| <= qmax,   sign(x) qmax  otherwise,
    qmax = (2^(b-1) - 1) d.
It runs through the one fake-quant core: theta -> (s = d, q_p = qmax/d, q_n = -q_p) are differentiable
maps and the core's gradients w.r.t. x, s and q_p give exactly the STE gradients of Eq. 2-3:
    U1 [b, d]:     inside dQ/db = 0, dQ/dd = (Q-x)/d;  outside dQ/db = 2^(b-1) ln2 d sign(x),
                   dQ/dd = (2^(b-1)-1) sign(x)                                          (Eq. 3a)
    U2 [b, qmax]:  inside dQ/db = -2^(b-1) ln2/(2^(b-1)-1) (Q-x), dQ/dqmax = (Q-x)/qmax;
                   outside dQ/db = 0, dQ/dqmax = sign(x)                                 (Eq. 3b)
    U3 [d, qmax]:  inside dQ/dd = (Q-x)/d, dQ/dqmax = 0; outside dQ/dd = 0, dQ/dqmax = sign(x) (Eq. 3c)
Forward constraints (Sec. 2.2): b rounded to an integer, d rounded to a power of two, and qmax snapped
to the grid (round(qmax/d) d, as the official code does for the size) so every output is an integer
code times d; all three with straight-through gradients (for a float d that is not a power of two
the gradients w.r.t. d carry the factor d_q/d of the log-domain STE; inside the range that makes
dQ/dd = (Q-x)/d with the float d). Unsigned activations use [0, qmax] and b = ceil(log2(qmax/d + 1))
(no sign bit); signed ones b = ceil(log2(qmax/d + 1) + 1) (Sec. 4).
With a bit set, tied W/A bits or a bits floor, the forward pass uses the full level range of the
effective bits (qmax = (2^(b-1) - 1) d); a one-element bit set freezes the bits (``freeze_bits_``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..attach import add_weight_transform, raw_weight, set_input_quantizer
from ..config import register_config, register_handler
from ..errors import ConfigError
from .configs import QuantConfig
from .fake_quant import fake_quant
from .pow2 import Pow2Quantizer
from .quantizer import register_quantizer
from .uhlich_params import (DEFAULT_RANGES, UhlichBase, bits_at_least, ceil_ste, check_bit_set,
                            check_range, pow2_ste, resolve_ranges, ste, tie)

PAPER_STEP = 2.0 ** -3     # d init from random init / activations (Sec. 4, train_resnet.py)


@register_quantizer
class UniformQuantizer(UhlichBase):
    """Uniform quantizer of Uhlich et al. with parametrization "U1" (b, d), "U2" (b, qmax) or "U3"
    (d, qmax) (recommended: bounded, decoupled gradients). See the module docstring for Eq. 1-3."""

    PARAMETRIZATIONS = {"U1": ("b", "d"), "U2": ("b", "qmax"), "U3": ("d", "qmax")}
    KIND = "uniform"

    def __init__(self, parametrization: str = "U3", role: str = "weight", **kw):
        super().__init__(parametrization, role, **kw)

    # -- differentiable maps theta -> (d_q, q_p) --
    def _grid(self):
        """(d_q, q_p, b_own): power-of-two step, top integer level (exact integer value, gradient of
        qmax/d), own bitwidth; before the bit-set/tie extension."""
        s, p = self._s(), self.parametrization
        if p == "U1":
            b = self._b()
            d = pow2_ste(self._r("d"))
            return d, torch.exp2(b - s) - 1, b
        if p == "U2":
            b = self._b()
            qmax = self._r("qmax")
            top = torch.exp2(b - s) - 1
            d = pow2_ste(qmax / top)
            q_int = torch.minimum(torch.round(qmax / d).clamp_min(1), top).detach()
            return d, ste(q_int * d, qmax) / d, b
        d = pow2_ste(self._r("d"))
        qmax = self._r("qmax")
        q_int = torch.round(qmax / d).clamp_min(1).detach()
        q_p = ste(q_int * d, qmax) / d          # value q_int exactly; dq_p/dd = -q_p/d, dq_p/dqmax = 1/d
        b = bits_at_least(ceil_ste(torch.log2(q_p + 1) + s), self._bmin())
        return d, q_p, b

    def own_bits_tensor(self) -> torch.Tensor:
        return self._grid()[2]

    def levels(self):
        """(d_q, q_n, q_p) used by the forward pass (tensors; q_p an exact integer value)."""
        d, q_p, b_own = self._grid()
        if self.extended:
            full = torch.exp2(self.bits_tensor() - self._s()) - 1
            q_p = full.detach() if self.frozen else ste(full, q_p)
        return d, (-q_p if self._sgn else torch.zeros_like(q_p).detach()), q_p

    def quantize(self, x):
        d, q_n, q_p = self.levels()
        return fake_quant(x, d.to(x.dtype), q_n.to(x.dtype), q_p.to(x.dtype))

    # -- initialisation (Sec. 4 and model_resnet.py) --
    def _values(self, d: float, b: int) -> dict:
        """b, d and qmax = (2^(b-s) - 1) d (Eq. 1) at the requested b. When d (a power of two) lies
        outside what the ranges allow at b bits (d range; for U2/U3 also qmax = L d in the qmax
        range), d moves to the nearest allowed power of two and qmax follows it: the bits stay b
        whatever max|x| (the range is clipped instead; training moves d and qmax from there)."""
        L = 2 ** (b - self._s()) - 1
        p = self.parametrization
        bounds = []
        if p in ("U1", "U3"):
            bounds.append((*self._exp_range("d"), False))
        if p in ("U2", "U3"):
            bounds.append((*self._exp_range("qmax", L), True))
        e = self._init_exponent(math.log2(d), bounds)
        if e is None:
            raise ConfigError(self._unreachable_msg())
        return {"b": b, "d": 2.0 ** e, "qmax": L * 2.0 ** e}

    def paper_init(self):
        self._set_init(self._values(PAPER_STEP, self.init_bits))

    def init_from_max(self, maxabs: float):
        b = self.init_bits
        self._set_init(self._values(self._delta(maxabs, b, self._s()), b))

    def clip_bound(self):
        return self.d if "d" in self._parameters else self._grid()[0]

    # -- export --
    def quant_params(self) -> dict:
        if self._sgn is None:
            raise ConfigError("activation quantizer is not initialised yet: run slimtorch.calibrate "
                              "or one forward pass first")
        with torch.no_grad():
            d, q_n, q_p = self.levels()
        q_p = int(q_p)
        return {"scale": d.detach().reshape(1), "offset": None, "q_n": -q_p if self._sgn else 0,
                "q_p": q_p}


# ---------------------------------------------------------------------------------------------
# config and handler
# ---------------------------------------------------------------------------------------------
KINDS = {"uniform": ("U1", "U2", "U3"), "pow2": ("P1", "P2", "P3")}
UNITS = {"B": 1.0, "kB": 1024.0}
_W, _A = DEFAULT_RANGES["weight"], DEFAULT_RANGES["activation"]


@register_config("uhlich")
@dataclass(frozen=True)
class Uhlich(QuantConfig):
    """Learned mixed precision (Uhlich et al. 2020). Every layer quantized, first and last included.

    kind: "uniform" | "pow2"; parametrization: U1/U2/U3 or P1/P2/P3 (default U3 / P3).
    w_bits / a_bits: initial bitwidths (4 as in the paper); a_bits None = float activations.
    w_init: "float" (d = 2^floor(log2(max|W| / (2^(b-1)-1)))) | "paper" (d = 2^-3);
    a_init: "paper" (d = 2^-3, qmax = d (2^b - 1)) | "float" (from calibration data max|x|).
    activations: "auto" (signed if the first data has negatives) | "signed" | "unsigned".
    Ranges (min, max) default to the official code's. bit_set: e.g. (2, 4, 8): bits rounded up to
    the set in forward and size. tie_bits: a layer's W and A use max(b_w, b_a).
    w_zero / a_zero: pow2 zero level (weights without, activations with, as the official code).
    target_weight / target_act_sum / target_act_max: memory budgets in ``target_unit`` ("kB" = 1024 B,
    or "B"), penalised with lambdas (lambda_w, lambda_sum, lambda_max) * max(0, g)^2 (Eq. 10).
    bias_bits: count the bias at the weight bits (paper Table 2) instead of float32 (packed file).
    clip_grads: clip d/qmax gradients to [-d, d]; None = on exactly when a target is set (official).
    freeze_after: ``step(model)`` freezes every layer's bits once the targets are met for this many
    consecutive steps (None: never); freeze_at: ... at this step anyway, lowering weight bits
    greedily if the weight target is still exceeded (None: never). See search/bit_freeze.py.
    """
    kind: str = "uniform"
    parametrization: str | None = None
    activations: str = "auto"
    w_init: str = "float"
    a_init: str = "paper"
    w_d_range: tuple[float, float] = _W["d"]
    w_qmax_range: tuple[float, float] = _W["qmax"]
    w_qmin_range: tuple[float, float] = _W["qmin"]
    w_b_range: tuple[float, float] = _W["b"]
    a_d_range: tuple[float, float] = _A["d"]
    a_qmax_range: tuple[float, float] = _A["qmax"]
    a_qmin_range: tuple[float, float] = _A["qmin"]
    a_b_range: tuple[float, float] = _A["b"]
    bit_set: tuple[int, ...] | None = None
    w_zero: bool = False
    a_zero: bool = True
    target_weight: float | None = None
    target_act_sum: float | None = None
    target_act_max: float | None = None
    target_unit: str = "kB"
    lambdas: tuple[float, float, float] = (0.1, 0.1, 0.1)
    bias_bits: bool = False
    clip_grads: bool | None = None
    freeze_after: int | None = 10
    freeze_at: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.kind not in KINDS:
            raise ConfigError(f"kind={self.kind!r}; expected one of {sorted(KINDS)}")
        if self.parametrization is not None and self.parametrization not in KINDS[self.kind]:
            raise ConfigError(f"parametrization={self.parametrization!r} does not fit kind={self.kind!r}; "
                              f"expected one of {KINDS[self.kind]}")
        if self.weights != "per_tensor":
            raise ConfigError("weights: Uhlich quantizers are per-tensor (one d/qmax per layer)")
        for name, ok in (("activations", ("auto", "signed", "unsigned")), ("w_init", ("float", "paper")),
                         ("a_init", ("float", "paper")), ("target_unit", tuple(UNITS))):
            if getattr(self, name) not in ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}; expected one of {ok}")
        self.w_ranges(), self.a_ranges()
        check_bit_set(self.bit_set)
        for name in ("target_weight", "target_act_sum", "target_act_max"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise ConfigError(f"{name}={v!r}: a budget must be a number > 0 (or None)")
        if len(self.lambdas) != 3 or any(not isinstance(v, (int, float)) or v < 0 for v in self.lambdas):
            raise ConfigError(f"lambdas={self.lambdas!r}: expected three numbers >= 0")
        for name in ("freeze_after", "freeze_at"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name}={v!r}: expected a number of steps >= 1 (or None)")
        if self.kind == "pow2" and self.activations == "unsigned" and not self.a_zero:
            raise ConfigError("a_zero=False with unsigned pow2 activations cannot represent 0")

    @property
    def param(self) -> str:
        return self.parametrization or KINDS[self.kind][2]

    def w_ranges(self) -> dict:
        return resolve_ranges("weight", {"d": self.w_d_range, "qmax": self.w_qmax_range,
                                         "qmin": self.w_qmin_range, "b": self.w_b_range})

    def a_ranges(self) -> dict:
        return resolve_ranges("activation", {"d": self.a_d_range, "qmax": self.a_qmax_range,
                                             "qmin": self.a_qmin_range, "b": self.a_b_range})

    @property
    def has_targets(self) -> bool:
        return any(v is not None for v in (self.target_weight, self.target_act_sum, self.target_act_max))


def make_quantizer(kind: str, parametrization: str, role: str, **kw) -> UhlichBase:
    if kind == "pow2":
        return Pow2Quantizer(parametrization, role, **kw)
    kw.pop("with_zero", None)
    return UniformQuantizer(parametrization, role, **kw)


@register_handler(Uhlich)
def _apply_uhlich(model: nn.Module, cfg: Uhlich, layers, bits):
    clip = cfg.has_targets if cfg.clip_grads is None else cfg.clip_grads
    signed = {"auto": None, "signed": True, "unsigned": False}[cfg.activations]
    w_rng, a_rng = cfg.w_ranges(), cfg.a_ranges()
    for name, m in layers.items():
        w_bits, a_bits = bits[name]
        w = raw_weight(m)
        to = {"device": w.device, "dtype": w.dtype if w.is_floating_point() else None}
        wq = make_quantizer(cfg.kind, cfg.param, "weight", signed=True, bits=w_bits, init=cfg.w_init,
                            ranges=w_rng, bit_set=cfg.bit_set, clip_grads=clip, with_zero=cfg.w_zero)
        if cfg.w_init == "float":
            wq.initialize(raw_weight(m).detach().float())
        add_weight_transform(m, wq.to(**to))
        if a_bits is not None and not isinstance(m, nn.Embedding):
            aq = make_quantizer(cfg.kind, cfg.param, "activation", signed=signed, bits=a_bits,
                                init=cfg.a_init, ranges=a_rng, bit_set=cfg.bit_set, clip_grads=clip,
                                with_zero=cfg.a_zero).to(**to)
            set_input_quantizer(m, aq)
            if cfg.tie_bits:
                tie(wq, aq)
    if cfg.has_targets:
        from ..search.penalty import MemoryBudget, attach_budget
        budget = MemoryBudget(weight=cfg.target_weight, act_sum=cfg.target_act_sum,
                              act_max=cfg.target_act_max, unit=cfg.target_unit, lambdas=cfg.lambdas,
                              bias_bits=cfg.bias_bits, freeze_after=cfg.freeze_after,
                              freeze_at=cfg.freeze_at)
        budget.check(model, activations=False)   # activation sizes are checked at the first penalty
        attach_budget(model, budget)


__all__ = ["Uhlich", "UniformQuantizer", "Pow2Quantizer", "make_quantizer", "tie", "check_range"]
