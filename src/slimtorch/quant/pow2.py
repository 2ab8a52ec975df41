"""Power-of-two quantizer of Uhlich et al. (ICLR 2020, Sec. 2.3) with parametrizations P1 (b, qmax),
P2 (b, qmin), P3 (qmin, qmax) (recommended).

Forward (Eq. 4), qmin and qmax powers of two, qmax = 2^(M-1) qmin with M = 2^(b-1) magnitudes:
    Q(x) = sign(x) qmin                       |x| < qmin
           sign(x) 2^round(log2|x|)           qmin <= |x| < qmax
           sign(x) qmax                       |x| >= qmax
With the zero level (activations, official ``with_zero=True``): |x| < qmin/sqrt(2) -> 0, one bit spent
on zero (M = 2^(b-1-sign)). Unsigned quantizers apply ReLU first.
Backward (Eq. 5, 6): dQ/dx = 2^round(log2|x|)/|x| in the middle band, 0 elsewhere;
dQ/dqmin = sign(x) in the qmin band, dQ/dqmax = sign(x) above qmax, 0 elsewhere. P1/P2 reach b through
the relation between qmin and qmax (chain rule). Inferred bitwidth (Sec. 4):
b = ceil(log2(log2(qmax/qmin) + 1) + 1) (the +1 is the sign bit, or the zero bit for unsigned
activations; signed with zero: +2).
Export codes: sign + exponent index k = log2(|Q|/qmin) (and code 0 for zero); ``decode`` rebuilds
qmin 2^k, bit-identical to the forward pass.
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .quantizer import register_quantizer
from .uhlich_params import EXP_MAX, EXP_MIN, SQRT2, UhlichBase, bits_at_least, ceil_ste, pow2_ste, ste


class _Pow2Quant(torch.autograd.Function):
    """Eq. 4 forward, Eq. 5/6 backward, for given power-of-two qmin <= qmax (tensors)."""

    @staticmethod
    def forward(ctx, x, qmin, qmax, signed: bool, with_zero: bool):
        if signed:
            ax = x.abs()
            sgn = torch.where(x < 0, -1.0, 1.0).to(x.dtype)
        else:
            ax = x.clamp_min(0)
            sgn = torch.ones_like(x)
        low = ax < qmin
        high = ax >= qmax
        mid = ~(low | high)
        mag = torch.exp2(torch.round(torch.log2(ax)))
        lvl = torch.where(mid, mag, torch.where(high, qmax, qmin))
        out = sgn * lvl
        if with_zero:
            zero = ax < qmin / SQRT2
            low = low & ~zero
            out = torch.where(zero, torch.zeros_like(out), out)
        ctx.save_for_backward(torch.where(mid, mag / ax.clamp_min(torch.finfo(x.dtype).tiny),
                                          torch.zeros_like(ax)), sgn, low, high, qmin, qmax)
        return out

    @staticmethod
    def backward(ctx, g):
        dx, sgn, low, high, qmin, qmax = ctx.saved_tensors
        gx = g * dx if ctx.needs_input_grad[0] else None
        gmin = (g * sgn * low).sum().reshape(qmin.shape) if ctx.needs_input_grad[1] else None
        gmax = (g * sgn * high).sum().reshape(qmax.shape) if ctx.needs_input_grad[2] else None
        return gx, gmin, gmax, None, None


def pow2_quant(x, qmin, qmax, signed: bool = True, with_zero: bool = False):
    """Power-of-two fake quantization of ``x`` (Eq. 4) with straight-through gradients (Eq. 5, 6)."""
    return _Pow2Quant.apply(x, qmin, qmax, bool(signed), bool(with_zero))


@register_quantizer
class Pow2Quantizer(UhlichBase):
    """Power-of-two quantizer with parametrization "P1" (b, qmax), "P2" (b, qmin) or "P3"
    (qmin, qmax). ``with_zero`` adds the zero level (required for unsigned activations)."""

    PARAMETRIZATIONS = {"P1": ("b", "qmax"), "P2": ("b", "qmin"), "P3": ("qmin", "qmax")}
    KIND = "pow2"

    def __init__(self, parametrization: str = "P3", role: str = "weight", **kw):
        super().__init__(parametrization, role, **kw)
        if self._sgn is False and not self.with_zero:
            raise ConfigError("unsigned pow2 quantizer without zero level cannot represent 0: "
                              "use with_zero=True")

    def _z(self) -> int:
        return int(self.with_zero)

    def _bmin(self) -> int:
        return max(self.ranges["b"][0], self._s() + self._z(), 1)

    def _grid(self):
        """(qmin_q, qmax_q, b_own) before the bit-set/tie extension; powers of two (exact)."""
        s, z, p = self._s(), self._z(), self.parametrization
        if p == "P3":
            qmax = pow2_ste(self._r("qmax"))
            qmin = torch.minimum(pow2_ste(self._r("qmin")), qmax)
            levels = torch.log2(qmax / qmin) + 1
            b = bits_at_least(ceil_ste(torch.log2(levels) + s + z), self._bmin())
        else:
            b = self._b()
            m = torch.exp2(b - s - z)
            if p == "P1":
                qmax = pow2_ste(self._r("qmax"))
                qmin = qmax * torch.exp2(1 - m)
            else:
                qmin = pow2_ste(self._r("qmin"))
                qmax = qmin * torch.exp2(m - 1)
        return qmin.clamp_min(2.0 ** EXP_MIN), qmax.clamp_max(2.0 ** EXP_MAX), b

    def own_bits_tensor(self):
        return self._grid()[2]

    def levels(self):
        """(qmin, qmax) used by the forward pass."""
        qmin, qmax, _ = self._grid()
        if self.extended:
            m = torch.exp2(self.bits_tensor() - self._s() - self._z())
            full = (qmax * torch.exp2(1 - m.detach())).clamp_min(2.0 ** EXP_MIN)
            qmin = full if self.frozen else ste(full, qmin)
        return qmin, qmax

    def quantize(self, x):
        qmin, qmax = self.levels()
        return pow2_quant(x, qmin.to(x.dtype), qmax.to(x.dtype), bool(self._sgn), self.with_zero)

    # -- initialisation (model_resnet.py get_quantizers / nonl) --
    def _values(self, d: float, b: int) -> dict:
        """b, qmax = 2^round(log2(d (2^(b-s) - 1))) and qmin = qmax / 2^(M-1) (Eq. 4 relation, M
        magnitudes). qmax (P1, P3) and qmin (P2, P3) are moved into their ranges together, keeping
        the ratio, so the bits stay b whatever max|x|. P3 whose ranges cannot hold the full ratio
        (6 bits: 2^31) gets the smallest ratio that still infers b bits (2^(M/2)), and beyond that
        (8 bits) the widest one: enough when a bit set rounds up to b, refused otherwise."""
        s, z = self._s(), self._z()
        m1 = 2 ** (b - s - z) - 1
        p = self.parametrization
        qmax_b = (*self._exp_range("qmax"), False)
        qmin_b = (*self._exp_range("qmin", shift=m1), False)
        bounds = {"P1": [qmax_b], "P2": [qmin_b], "P3": [qmax_b, qmin_b]}[p]
        e0 = math.log2(d * (2 ** (b - s) - 1))
        e = self._init_exponent(e0, bounds)
        if e is None:                    # P3 only: a ratio that still infers b bits (Sec. 4)
            r = 2 ** max(b - s - z - 1, 0)       # b = ceil(log2(r + 1) + s + z) needs r >= this
            e = self._init_exponent(e0, [qmax_b, (*self._exp_range("qmin", shift=r), False)])
            if e is None:
                e = self._init_exponent(e0, [qmax_b])
            lo_min = round(math.log2(self.ranges["qmin"][0]))
            return {"b": b, "qmax": 2.0 ** e, "qmin": 2.0 ** min(max(e - m1, lo_min), e)}
        return {"b": b, "qmax": 2.0 ** e, "qmin": 2.0 ** (e - m1)}

    def paper_init(self):
        self._set_init(self._values(2.0 ** -3, self.init_bits))

    def init_from_max(self, maxabs: float):
        b = self.init_bits
        self._set_init(self._values(self._delta(maxabs, b, self._s()), b))

    def clip_bound(self):
        return self.qmin if "qmin" in self._parameters else self._grid()[0]

    # -- export: sign + exponent-index codes --
    def _n_mag(self) -> int:
        return 2 ** (self.bits - self._s() - self._z())

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes in [0, 2^bits): 0 = zero (with_zero), then z + k for +qmin 2^k, z + M + k for -."""
        qmin, qmax = self.levels()
        out = pow2_quant(x, qmin.to(x.dtype), qmax.to(x.dtype), bool(self._sgn), self.with_zero)
        a = out.abs()
        k = torch.frexp(torch.where(a > 0, a, qmin.to(a.dtype))).exponent.long() \
            - int(torch.frexp(qmin.to(a.dtype)).exponent)
        codes = k + self._z() + (out < 0).long() * self._n_mag()
        return torch.where(a > 0, codes, torch.zeros_like(codes))

    def to_int(self, x):
        return self.encode(x)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        qmin, _ = self.levels()
        z, m = self._z(), self._n_mag()
        c = codes.long() - z
        neg = (c >= m) if self._sgn else torch.zeros_like(c, dtype=torch.bool)
        k = c - m * neg.long()
        val = qmin.detach() * torch.exp2(k.to(qmin.dtype))
        val = torch.where(neg, -val, val)
        return torch.where(codes.long() == 0, torch.zeros_like(val), val) if z else val

    def quant_params(self) -> dict:
        if self._sgn is None:
            raise ConfigError("activation quantizer is not initialised yet: run slimtorch.calibrate "
                              "or one forward pass first")
        with torch.no_grad():
            qmin, qmax = self.levels()
        return {"kind": "pow2", "scale": qmin.detach().reshape(1), "offset": None, "q_n": 0,
                "q_p": 2 ** self.bits - 1, "qmin": qmin.detach(), "qmax": qmax.detach(),
                "signed": bool(self._sgn), "with_zero": self.with_zero}
