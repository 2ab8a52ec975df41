"""Shared machinery of the Uhlich et al. (ICLR 2020) quantizers: straight-through helpers, parameter
ranges (the official code's defaults), the inferred/effective bitwidth logic (bit sets, tied W/A bits)
and the base module with initialisation, value clipping and gradient clipping.

Power-of-two constraints are imposed in the forward pass only (Sec. 2.2): ``pow2_ste(v) =
2^round_ste(log2 v)``, so the gradient reaching a float parameter v is (v_q / v) times the gradient
with respect to the rounded v_q (this is what the official nnabla code does). For a v that already is a
power of two the factor is 1 and the paper's Eq. 3/6 hold verbatim; inside the range the chain rule
gives exactly (Q(x) - x)/d with the float d for every d."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .fake_quant import round_ste
from .quantizer import Quantizer

SQRT2 = math.sqrt(2.0)
EXP_MIN, EXP_MAX = -126, 127          # pow2 exponents kept inside float32's normal range
CLIP_MARGIN = 1e-5                    # clip_quant_vals of the official code: range +/- 1e-5

# Parameter ranges of sony/ai-research-code mixed-precision-dnns train_resnet.py (Configuration)
DEFAULT_RANGES = {
    "weight": {"d": (2.0 ** -8, 1.0), "qmax": (2.0 ** -8, 127.0), "qmin": (2.0 ** -16, 127.0),
               "b": (2, 8)},
    "activation": {"d": (2.0 ** -8, 1.0), "qmax": (2.0 ** -8, 255.0), "qmin": (2.0 ** -14, 255.0),
                   "b": (1, 8)},
}
BIT_SET_RANGE = (1, 8)


def ste(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` exactly in the forward pass, the gradient of ``surrogate`` in the backward pass."""
    return value.detach() + (surrogate - surrogate.detach())


def ceil_ste(x: torch.Tensor) -> torch.Tensor:
    """ceil(x) forward, identity backward (nnabla's F.ceil, used for the inferred bitwidth)."""
    return ste(torch.ceil(x), x)


def bits_at_least(b: torch.Tensor, bmin: int) -> torch.Tensor:
    """max(b, bmin) for an inferred bitwidth b = ceil_ste(...), with zero gradient once b <= bmin:
    a size already at its smallest bitwidth must not keep pushing d up / qmax down."""
    return torch.where(b.detach() <= bmin, torch.full_like(b, float(bmin)).detach(), b)


def pow2_ste(v: torch.Tensor) -> torch.Tensor:
    """2^round(log2 v), exactly a power of two; backward through round_ste: d/dv = v_q / v."""
    return torch.exp2(round_ste(torch.log2(v)))


def snap_up(b: torch.Tensor, bit_set) -> torch.Tensor:
    """Smallest element of ``bit_set`` >= b (the largest element if b exceeds them all); identity
    gradient. ``bit_set`` is a sorted tuple of ints."""
    out = torch.full_like(b, float(bit_set[-1]))
    for v in reversed(bit_set[:-1]):
        out = torch.where(b <= v, torch.full_like(b, float(v)), out)
    return ste(out, b)


def check_range(name: str, rng, positive: bool = True) -> tuple:
    try:
        lo, hi = (float(v) for v in rng)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a (min, max) pair, got {rng!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError(f"{name}={rng!r}: bounds must be finite")
    if lo >= hi:
        raise ConfigError(f"{name}={rng!r}: min must be < max")
    if positive and lo <= 0:
        raise ConfigError(f"{name}={rng!r}: min must be > 0")
    return lo, hi


def check_bit_set(bit_set, what: str = "bit_set"):
    """None, or a non-empty collection of distinct integers in 1..8 -> sorted tuple."""
    if bit_set is None:
        return None
    try:
        vals = list(bit_set)
    except TypeError:
        raise ConfigError(f"{what}={bit_set!r}: expected a list of integers") from None
    if not vals:
        raise ConfigError(f"{what} is empty: give at least one bitwidth in "
                          f"{BIT_SET_RANGE[0]}..{BIT_SET_RANGE[1]} (or None for any bitwidth)")
    bad = [v for v in vals if isinstance(v, bool) or not isinstance(v, int)
           or not BIT_SET_RANGE[0] <= v <= BIT_SET_RANGE[1]]
    if bad:
        raise ConfigError(f"{what}={tuple(vals)!r}: {bad} out of range; bitwidths must be integers "
                          f"in {BIT_SET_RANGE[0]}..{BIT_SET_RANGE[1]}")
    return tuple(sorted(set(vals)))


def resolve_ranges(role: str, ranges: dict | None) -> dict:
    """Defaults of ``role`` overridden by ``ranges`` ({"d"|"qmax"|"qmin"|"b": (min, max)}), checked."""
    out = dict(DEFAULT_RANGES[role])
    for k, v in (ranges or {}).items():
        if k not in out:
            raise ConfigError(f"unknown parameter range {k!r}; expected some of {sorted(out)}")
        out[k] = v
    checked = {k: check_range(f"{role} {k} range", v) for k, v in out.items()}
    blo, bhi = checked["b"]
    if blo != int(blo) or bhi != int(bhi):
        raise ConfigError(f"{role} b range {out['b']!r}: bitwidth bounds must be integers")
    checked["b"] = (int(blo), int(bhi))
    return checked


def tie(wq: "UhlichBase", aq: "UhlichBase") -> None:
    """Tie a layer's weight and activation bits: both use b = max(b_w, b_a) (in forward and size)."""
    wq.__dict__["_partner"], aq.__dict__["_partner"] = aq, wq


class UhlichBase(Quantizer):
    """Common state of the uniform (U1-U3) and power-of-two (P1-P3) quantizers.

    Learnable scalars named after the paper: ``b`` (bitwidth), ``d`` (step), ``qmax``, ``qmin``.
    ``bits`` is the current integer bitwidth: b(theta) inferred from the parameters (Sec. 4; for b
    parametrizations round(b)), then max with the tied partner's, then rounded up to ``bit_set``. When a
    bit set, a tie or ``bits_floor`` is active the forward pass uses the full level range of ``bits``."""

    PARAMETRIZATIONS: dict = {}      # name -> learnable parameter names
    KIND = ""

    def __init__(self, parametrization: str, role: str = "weight", *, signed: bool | None = True,
                 bits: int = 4, init: str = "float", ranges: dict | None = None, bit_set=None,
                 clip_grads: bool = False, bits_floor: int = 0, with_zero: bool = False):
        super().__init__()
        if parametrization not in self.PARAMETRIZATIONS:
            raise ConfigError(f"{self.KIND} quantizer: parametrization {parametrization!r}; expected one "
                              f"of {sorted(self.PARAMETRIZATIONS)}")
        if role not in ("weight", "activation"):
            raise ConfigError(f"role must be 'weight' or 'activation', got {role!r}")
        if init not in ("float", "paper"):
            raise ConfigError(f"init={init!r}; expected 'float' (from data) or 'paper' (fixed d=2^-3)")
        if role == "weight" and signed is None:
            signed = True
        self.parametrization, self.role, self.init = parametrization, role, init
        self.ranges = resolve_ranges(role, ranges)
        lo, hi = self.ranges["b"]
        if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
            raise ConfigError(f"{role} init bits={bits!r} outside the b range {lo}..{hi}")
        self.bit_set = check_bit_set(bit_set)
        self.init_bits, self.with_zero, self.clip_grads = bits, bool(with_zero), bool(clip_grads)
        self.bits_floor = int(bits_floor)
        for name in self.PARAMETRIZATIONS[parametrization]:
            self.register_parameter(name, nn.Parameter(torch.tensor(float(bits) if name == "b" else 1.0)))
        self.register_buffer("_signed", torch.tensor(-1 if signed is None else int(signed)))
        self.register_buffer("_initialized", torch.tensor(False))
        self._hooked = None
        self.sample_numel = None
        self._sync()
        if init == "paper":
            self.paper_init()

    def _s(self) -> int:
        """Bits spent on the sign (unknown activation sign counts as unsigned)."""
        return 1 if self._sgn else 0

    def _r(self, name) -> torch.Tensor:
        """Parameter ``name`` clamped to its range (gradient 0 outside, as nnabla's clip_scalar)."""
        lo, hi = self.ranges[name]
        return getattr(self, name).clamp(lo, hi)

    def _bmin(self) -> int:
        """Smallest usable bitwidth: the b range's min, and at least 1 + sign (one level above 0)."""
        return max(self.ranges["b"][0], 1 + self._s())

    def _b(self) -> torch.Tensor:
        return round_ste(self.b.clamp(float(self._bmin()), float(self.ranges["b"][1])))

    # -- bitwidths --
    def own_bits_tensor(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def frozen(self) -> bool:
        """A single-element bit set fixes the bits: the level range is then a constant."""
        return self.bit_set is not None and len(self.bit_set) == 1

    @property
    def extended(self) -> bool:
        return (self.bit_set is not None or self.bits_floor > 0
                or self.__dict__.get("_partner") is not None)

    def bits_tensor(self) -> torch.Tensor:
        """Effective bits as a tensor: value = ``bits``, gradient of the continuous b(theta)
        (a constant when the bits are frozen by a one-element bit set)."""
        if self.frozen:
            return self.own_bits_tensor().detach().clone().fill_(float(self.bit_set[0]))
        b = self.own_bits_tensor()
        partner = self.__dict__.get("_partner")
        if partner is not None:
            b = torch.maximum(b, partner.own_bits_tensor().to(b))
        if self.bits_floor > 0:
            b = b.clamp_min(float(self.bits_floor))
        if self.bit_set is not None:
            b = snap_up(b, self.bit_set)
        return b

    @property
    def bits(self) -> int:
        with torch.no_grad():
            return int(self.bits_tensor())

    def extra_repr(self):
        sgn = {None: "auto", True: "signed", False: "unsigned"}[self._sgn]
        return (f"{self.parametrization}, {self.role}, {sgn}, bits={self.bits}"
                + (f", bit_set={self.bit_set}" if self.bit_set else "")
                + (", tied" if self.__dict__.get("_partner") is not None else ""))

    # -- initialisation --
    def paper_init(self):  # pragma: no cover - interface
        raise NotImplementedError

    def init_from_max(self, maxabs: float):  # pragma: no cover - interface
        raise NotImplementedError

    def _delta(self, maxabs: float, b: int, s: int) -> float:
        """Float-net init (Sec. 4): d = 2^floor(log2(max|x| / (2^(b-s) - 1))); the official
        find_delta uses ceil instead of floor when b > 4."""
        v = math.log2(max(maxabs, 1e-12) / (2 ** (b - s) - 1))
        return 2.0 ** (math.ceil(v) if b > 4 else math.floor(v))

    def _exp_range(self, name: str, scale: float = 1.0, shift: int = 0) -> tuple:
        """Exponents e such that 2^e * scale is a value parameter ``name`` reaches in the forward pass
        (its range less the clipping margin, then pow2 rounding), e shifted by ``shift``: (lo, hi)
        as floats."""
        lo, hi = self.ranges[name]
        lo, hi = lo + CLIP_MARGIN, hi - CLIP_MARGIN
        return math.log2(lo / scale) + shift, math.log2(hi / scale) + shift

    def _init_exponent(self, e: float, bounds) -> int:
        """round(e) moved into the intersection of ``bounds`` [(lo, hi), ...] (log2 domain, rounded
        to the nearest integer exponent as the forward pass's pow2 rounding does; a bound whose
        third entry is True is exact: ceil/floor); None when the ranges leave no exponent."""
        lo = max(math.ceil(b[0] - 1e-9) if b[2] else round(b[0]) for b in bounds)
        hi = min(math.floor(b[1] + 1e-9) if b[2] else round(b[1]) for b in bounds)
        return None if lo > hi else int(min(max(round(e), lo), hi))

    def _unreachable_msg(self) -> str:
        names = ", ".join(f"{k} {self.ranges[k]}" for k in self._parameters if k != "b")
        return (f"{self.KIND} {self.parametrization} {self.role} quantizer: init bits={self.init_bits} "
                f"cannot be represented within the parameter ranges ({names}); widen the range(s) "
                "(e.g. the qmin range for pow2), choose fewer bits or a b parametrization (U1/U2, P1/P2)")

    def _effective(self, b: int) -> int:
        """Bits ``b`` after the floor and the bit set (no tie): what read_plan shows for own bits b."""
        b = max(b, self.bits_floor)
        return b if self.bit_set is None else next((v for v in self.bit_set if v >= b), self.bit_set[-1])

    def _set_init(self, values: dict) -> None:
        """Set the initial parameters and check that they give the requested bits (item: the init
        keeps ``init_bits`` whatever the data range; ranges that cannot represent them are an error)."""
        self._set(**values)
        with torch.no_grad():
            own = int(self.own_bits_tensor())
        want = max(self.init_bits, self._bmin())
        if not self.frozen and self._effective(own) != self._effective(want):
            raise ConfigError(self._unreachable_msg() + f" (they give {own} bits)")

    def _set(self, **values):
        for k, v in values.items():
            if k in self._parameters:
                lo, hi = self.ranges[k]
                getattr(self, k).data.fill_(min(max(float(v), lo + CLIP_MARGIN), hi - CLIP_MARGIN)
                                            if k != "b" else float(v))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor):
        """Decide the sign of an activation quantizer from data (signed if it has negative values)
        and, with ``init="float"``, set the parameters from max|x| at the initial bitwidth."""
        if x.numel() == 0:
            raise ConfigError("cannot initialise a quantizer from an empty tensor")
        if self._sgn is None:
            self._signed.fill_(int(bool(x.min() < 0)))
            self._sync()
        if self.init == "float":
            self.init_from_max(float(x.detach().abs().max()))
        else:
            self.paper_init()
        self._initialized.fill_(True)
        self._sync()

    # -- calibration protocol: observe the range only --
    def _observe(self, x):
        self._obs.append(torch.stack([x.detach().min(), x.detach().abs().max()]).float().cpu())

    def finish_observing(self):
        obs = getattr(self, "_obs", [])
        self.discard_observations()
        if obs:
            o = torch.stack(obs)
            self.initialize(torch.stack([o[:, 0].min(), o[:, 1].max()]))

    # -- stabilisers of the official code --
    def clip_bound_name(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    @torch.no_grad()
    def clip_values_(self):
        """``clip_quant_vals``: every parameter into its range +/- 1e-5; for (d, qmax) / (qmin, qmax)
        keep the lower one below qmax (min/max swap as in the official code)."""
        low = "d" if "d" in self._parameters else "qmin" if "qmin" in self._parameters else None
        if low is not None and "qmax" in self._parameters:
            lo_p, hi_p = getattr(self, low), self.qmax
            new_lo = torch.minimum(lo_p, hi_p - CLIP_MARGIN)
            new_hi = torch.maximum(lo_p + CLIP_MARGIN, hi_p)
            lo_p.copy_(new_lo)
            hi_p.copy_(new_hi)
        for name, p in self._parameters.items():
            lo, hi = self.ranges[name]
            p.clamp_(lo + CLIP_MARGIN, hi - CLIP_MARGIN)

    def _maybe_hook(self):
        """``clip_quant_grads``: grad of d/qmax (or qmin/qmax) clipped to [-d, d] ([-qmin, qmin]).
        Tensor hooks see the total gradient of one backward pass (task loss + penalty)."""
        if not self.clip_grads:
            return
        names = [n for n in ("d", "qmin", "qmax") if n in self._parameters]
        key = tuple(id(getattr(self, n)) for n in names)
        if self._hooked == key:
            return
        for n in names:
            getattr(self, n).register_hook(self._clip_hook)
        self._hooked = key

    def _clip_hook(self, grad):
        if not self.clip_grads:
            return grad
        bound = self.clip_bound().detach().to(grad)
        return torch.maximum(torch.minimum(grad, bound), -bound)

    def clip_bound(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    # -- forward --
    def quantize(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observed_or_initialised(x):
            return x
        if self.role == "activation":
            self.sample_numel = x[0].numel() if x.dim() > 1 else x.numel()
        self._maybe_hook()
        return self.quantize(x)

    def spec(self) -> dict:
        """Constructor arguments; ``bits_floor`` records the effective bits when tied, so a rebuilt
        quantizer (without its partner) reproduces the same forward pass."""
        floor = self.bits if self.__dict__.get("_partner") is not None else self.bits_floor
        return {"type": type(self).__name__, "parametrization": self.parametrization, "role": self.role,
                "signed": self._sgn, "bits": self.init_bits, "init": self.init,
                "ranges": {k: list(v) for k, v in self.ranges.items()},
                "bit_set": list(self.bit_set) if self.bit_set else None,
                "clip_grads": self.clip_grads, "bits_floor": floor, "with_zero": self.with_zero}

    def num_qparam_values(self) -> int:
        """Float values the packed file stores for this quantizer: its float state (the two learned
        scalars of the parametrization, e.g. d and qmax for U3), as ``save_packed`` writes them."""
        return sum(v.numel() for v in self.state_dict().values() if v.is_floating_point())
