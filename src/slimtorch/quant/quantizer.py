"""Fake quantizer modules. ``Quantizer`` is the interface every weight/activation quantizer in
slimtorch implements (report, budgets and export read only this interface); ``LSQQuantizer`` is the
learned-step-size quantizer of LSQ (Esser et al. 2020) and, with ``learn_offset``, LSQ+ (Bhalgat et
al. 2020). Both run through the shared core :func:`slimtorch.quant.fake_quant.fake_quant`."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .fake_quant import dequantize, fake_quant, grad_scale, qrange, quantize_int
from .init import EPS, lsq_init, minmax_init, mse_init, three_sigma_init
from .observers import check_percentile, make_observer

INITS = ("lsq", "3sigma", "mse", "minmax")            # the paper inits, from samples of the data
# activation inits backed by an accumulating observer (quant/observers.py): a_init -> observer name
OBSERVER_INITS = {"minmax": "minmax", "percentile": "percentile", "mse_hist": "mse", "entropy": "entropy"}
A_INITS = INITS + tuple(k for k in OBSERVER_INITS if k not in INITS)
MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits, what="bits", lo=MIN_BITS, hi=MAX_BITS) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise ConfigError(f"{what}={bits!r} is out of range: expected an integer in {lo}..{hi}")
    return bits


QUANTIZER_TYPES: dict[str, type] = {}


def register_quantizer(cls):
    """Make a Quantizer subclass rebuildable from ``spec()`` by name (used by the packed loader)."""
    QUANTIZER_TYPES[cls.__name__] = cls
    return cls


def build_quantizer(spec: dict) -> "Quantizer":
    spec = dict(spec)
    name = spec.pop("type", None)
    if name not in QUANTIZER_TYPES:
        raise ConfigError(f"unknown quantizer type {name!r}; known: {sorted(QUANTIZER_TYPES)}")
    return QUANTIZER_TYPES[name](**spec)


class Quantizer(nn.Module):
    """Interface of all slimtorch quantizers.

    ``bits`` (int), ``role`` ("weight" | "activation"), ``forward(x)`` (fake quantization),
    ``quant_params()`` -> dict(scale, offset, q_n, q_p) describing the integer grid actually used,
    ``to_int(x)`` -> integer levels, ``num_qparam_values()`` -> how many float parameters the
    deployed layer stores for this quantizer (for the byte accounting)."""

    role: str = "weight"
    cost_role = "quantizer"     # the cost protocol of slimtorch.cost

    @property
    def bits(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def quant_params(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def to_int(self, x: torch.Tensor) -> torch.Tensor:
        p = self.quant_params()
        return quantize_int(x, p["scale"], p["q_n"], p["q_p"], p["offset"])

    # -- export protocol: codes in [0, 2^bits) that decode bit-exactly to forward(x) --
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Unsigned integer codes (int64) in [0, 2^bits - 1] of x under this quantizer."""
        return (self.to_int(x) - self.quant_params()["q_n"]).to(torch.int64)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Float values of ``codes``: identical bits to ``forward`` on the encoded tensor."""
        p = self.quant_params()
        return dequantize(codes.to(p["scale"].dtype) + p["q_n"], p["scale"], p["offset"])

    def spec(self) -> dict:  # pragma: no cover - interface
        """JSON-able constructor arguments (with "type") so ``build_quantizer`` can rebuild it."""
        raise NotImplementedError

    def num_qparam_values(self) -> int:
        p = self.quant_params()
        return p["scale"].numel() + (p["offset"].numel() if p["offset"] is not None else 0)

    # -- Python mirrors of the _signed / _initialized buffers, so the hot path never reads a
    #    device tensor; subclasses call _sync_flags() from their _sync() --
    def _sync_flags(self):
        s = int(self._signed)
        self._sgn = None if s < 0 else bool(s)
        self._init_done = bool(self._initialized)

    def _sync(self):
        self._sync_flags()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._sync()

    @property
    def signed(self):
        return self._sgn

    @property
    def initialized(self) -> bool:
        return self._init_done

    # calibration protocol (see slimtorch.calibrate)
    observing: bool = False
    _observer = None

    def make_observer(self):
        """The accumulating observer calibration feeds (None: keep samples in ``_obs``)."""
        return None

    def start_observing(self):
        self.observing, self._obs, self._observer = True, [], self.make_observer()

    def has_observed(self) -> bool:
        return bool(getattr(self, "_obs", [])) or (self._observer is not None and not self._observer.empty)

    def discard_observations(self):
        self.observing, self._obs, self._observer = False, [], None

    def finish_observing(self):
        self.observing = False

    def _observed_or_initialised(self, x: torch.Tensor) -> bool:
        """Start of every forward: while calibrating, record x and return True (pass x through);
        otherwise initialise from x on first use and return False."""
        if self.observing:
            self._observe(x)
            return True
        if not self._init_done:
            self.initialize(x)
        return False


@register_quantizer
class LSQQuantizer(Quantizer):
    """Learned step size s (and offset beta when ``learn_offset``), levels [q_n, q_p] from ``bits``.

    ``signed=None`` (activations only) is decided from the first data seen: signed if it has negative
    values. With ``learn_offset`` the levels are unsigned [0, 2^b - 1] and beta absorbs the offset
    (LSQ+ Eq. 2). ``scale_shape`` selects per-tensor (all ones) or per-channel (C, 1, ...) steps.
    The gradient scale is g = 1 / sqrt(N * Q_P) with N the elements per step size: for weights the
    elements of the tensor (or channel); for activations the features of one sample (LSQ's N_F,
    batch dimension excluded, so g does not depend on the batch size).

    ``integer_offset`` (LSQ+ only) rounds beta to a whole number of steps in the forward pass,
    z = round(beta / s) clamped so that 0 stays on the grid, i.e. levels [q_n + z, q_p + z] of
    x_bar = round(x / s): the asymmetric integer-zero-point grid that integer kernels run
    (onnxruntime QuantizeLinear zero point -(q_n + z)), with no float offset to subtract.
    beta still learns, through a straight-through estimator on the rounding (LSQ+ Eq. 5)."""

    def __init__(self, bits: int, role: str = "weight", *, signed: bool | None = True,
                 learn_offset: bool = False, scale_shape=(1,), init: str = "lsq",
                 narrow: bool = False, use_grad_scale: bool = True, integer_offset: bool = False,
                 percentile: float = 99.99, per_channel_input: bool = False):
        super().__init__()
        self.per_channel_input = role == "activation" and (          # quant/model_input.py
            per_channel_input or math.prod(scale_shape) > 1)          # (rebuilt from a packed spec)
        check_bits(bits, f"{role} bits", 1 if role == "weight" else 2)
        if role not in ("weight", "activation"):
            raise ConfigError(f"role must be 'weight' or 'activation', got {role!r}")
        inits = A_INITS if role == "activation" else INITS
        if init not in inits:
            raise ConfigError(f"unknown {role} init {init!r}; expected one of {inits}")
        self.percentile = check_percentile(percentile)
        if integer_offset and not learn_offset:
            raise ConfigError("integer_offset=True needs learn_offset=True (an LSQ+ offset to round)")
        if learn_offset:
            signed = False
        if signed and bits < 2:
            raise ConfigError(f"{role} bits={bits}: a signed quantizer needs at least 2 bits "
                              "(1 bit has no positive level)")
        self.role, self.init, self.narrow, self.learn_offset = role, init, narrow, learn_offset
        self.use_grad_scale, self.integer_offset = use_grad_scale, integer_offset
        self._spec = {"type": type(self).__name__, "bits": bits, "role": role, "signed": signed,
                      "learn_offset": learn_offset, "scale_shape": list(scale_shape), "init": init,
                      "narrow": narrow, "use_grad_scale": use_grad_scale}
        if integer_offset:   # only when set, so earlier packed files keep their exact spec
            self._spec["integer_offset"] = True
        if init == "percentile":
            self._spec["percentile"] = self.percentile
        self.scale = nn.Parameter(torch.ones(tuple(scale_shape)))
        self.offset = nn.Parameter(torch.zeros(tuple(scale_shape))) if learn_offset else None
        self.register_buffer("_bits", torch.tensor(bits, dtype=torch.int64))
        self.register_buffer("_signed", torch.tensor(-1 if signed is None else int(signed)))
        self.register_buffer("_initialized", torch.tensor(False))
        self._sync()

    # -- state mirrored in Python so the hot path never reads a device tensor --
    def _sync(self):
        self._b = int(self._bits)
        self._sync_flags()
        if self._sgn is not None:
            self.q_n, self.q_p = qrange(self._b, self._sgn, self.narrow)

    @property
    def bits(self) -> int:
        return self._b

    @bits.setter
    def bits(self, value: int):
        check_bits(value, f"{self.role} bits", 1 if self.role == "weight" else 2)
        self._bits.fill_(value)
        self._sync()

    def extra_repr(self):
        kind = ("lsq+ integer zero point" if self.integer_offset else "lsq+") if self.learn_offset else "lsq"
        per = "per-tensor" if self.scale.numel() == 1 else f"per-channel({self.scale.numel()})"
        return f"{kind}, {self.role}, bits={self._b}, signed={self._sgn}, {per}, init={self.init}"

    # -- initialisation --
    @torch.no_grad()
    def initialize(self, x: torch.Tensor):
        """Set s (and beta) from data ``x`` with the configured initialiser."""
        if x.numel() == 0:
            raise ConfigError("cannot initialise a quantizer from an empty tensor")
        if self._sgn is None:
            self._signed.fill_(int(bool(x.min() < 0)))
            self._sync()
        # activations: one range (copy_ broadcasts it over a per-channel model-input step, which
        # calibrate then sets per channel, quant/model_input.py)
        shape = self.scale.shape if self.role == "weight" else torch.Size([1])
        if self.role == "activation" and self.init in OBSERVER_INITS:
            obs = self.make_observer()
            obs.update(x)
            return self._init_from_observer(obs)
        if self.init == "lsq":
            self.scale.copy_(lsq_init(x, self.q_p, shape))
        elif self.init == "3sigma":
            self.scale.copy_(three_sigma_init(x, self._b, shape))
        elif self.init == "minmax":
            s, b = minmax_init(x, self.q_n, self.q_p, shape, self.learn_offset)
            self.scale.copy_(s)
            if b is not None:
                self.offset.copy_(b)
        else:  # mse: per tensor, or each channel on its own
            s, b, _ = mse_init(x, self.q_n, self.q_p, self.learn_offset, scale_shape=shape)
            self.scale.copy_(s)
            if b is not None:
                self.offset.copy_(b)
        if self.learn_offset and self.init in ("lsq", "3sigma"):
            _, b = minmax_init(x, self.q_n, self.q_p, shape, True)
            self.offset.copy_(b)
        self._initialized.fill_(True)
        self._sync()

    @torch.no_grad()
    def set_channel_steps(self, scale: torch.Tensor, offset: torch.Tensor | None):
        """Set one step (and offset) per channel, shaped to broadcast against the input (e.g.
        (1, C, 1, 1) for a conv; quant/model_input.py chooses them). The parameters stay the same
        objects (an optimizer keeps them); the spec's scale_shape follows."""
        self._set_param("scale", scale)
        if offset is not None:
            self._set_param("offset", offset)
        self._spec["scale_shape"] = list(scale.shape)
        self._initialized.fill_(True)
        self._sync()

    def _set_param(self, name: str, value: torch.Tensor):
        """Write ``value`` into parameter ``name`` in place (new shape allowed; same object)."""
        p = getattr(self, name)
        if p.shape == value.shape:
            p.copy_(value)
        else:
            p.data = value.to(p.detach())

    def adoptable(self, state_dict, prefix: str = "") -> list[str]:
        """Keys of ``state_dict`` whose step / offset shape this activation quantizer would take on
        load: per channel (a model input after calibration, quant/model_input.py) or back to one."""
        out = []
        for name in ("scale", "offset"):
            v, p = state_dict.get(prefix + name), getattr(self, name)
            if isinstance(v, torch.Tensor) and p is not None and v.shape != p.shape \
                    and self.role == "activation" and 1 in (p.numel(), v.numel()):
                out.append(prefix + name)
        return out

    def adopt_shapes(self, state_dict, prefix: str = "") -> bool:
        """Take the step / offset shapes ``adoptable`` names (values come with the load)."""
        keys = self.adoptable(state_dict, prefix)
        for key in keys:
            name = key[len(prefix):]
            p = getattr(self, name)
            p.data = p.detach().new_zeros(state_dict[key].shape)
            if name == "scale":
                self._spec["scale_shape"] = list(p.shape)
                self.per_channel_input = self.per_channel_input or p.numel() > 1
        return bool(keys)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.adopt_shapes(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def make_observer(self):
        if self.role != "activation" or self.init not in OBSERVER_INITS:
            return None
        return make_observer(OBSERVER_INITS[self.init], percentile=self.percentile)

    @torch.no_grad()
    def _init_from_observer(self, obs):
        """Set s (and beta) from an observer's clipping range (mapped as ``minmax_init`` does)."""
        if self._sgn is None:
            self._signed.fill_(int(obs.lo < 0))
            self._sync()
        lo, hi = obs.clip_range(self.q_n, self.q_p, self.learn_offset)
        s, b = minmax_init(torch.tensor([lo, hi], dtype=torch.float32), self.q_n, self.q_p,
                           (1,), self.learn_offset)      # copy_ broadcasts to a per-channel shape
        self.scale.copy_(s)
        if b is not None:
            self.offset.copy_(b)
        self._initialized.fill_(True)
        self._sync()

    # -- calibration: observe data, pass it through unchanged, initialise at the end --
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observed_or_initialised(x):
            return x
        n = x.numel() / self.scale.numel()
        if self.role == "activation" and x.dim() > 1:
            n /= x.shape[0]
        g = 1.0 / math.sqrt(max(n, 1.0) * self.q_p) if self.use_grad_scale else 1.0
        s = self.scale.clamp_min(EPS)
        if self.integer_offset:
            ratio = grad_scale(self.offset, g) / grad_scale(s, g)
            z = self._zero_shift(s.detach())
            free = (torch.round(ratio.detach()) == z).to(ratio.dtype)   # no gradient while clamped
            z = z + (ratio - ratio.detach()) * free                      # exact value, STE grad
            return fake_quant(x, s, self.q_n + z, self.q_p + z, None, g)
        return fake_quant(x, s, self.q_n, self.q_p, self.offset, g)

    def _zero_shift(self, s: torch.Tensor) -> torch.Tensor:
        """z = round(beta / s), clamped to [-q_p, -q_n] so that 0 is a grid point."""
        return torch.round(self.offset.detach() / s).clamp(-self.q_p, -self.q_n)

    @torch.no_grad()
    def _observe(self, x, keep=1 << 14):
        if self._observer is not None:
            return self._observer.update(x)
        flat = x.detach().reshape(-1)
        if flat.numel() > keep:
            idx = torch.randint(0, flat.numel(), (keep,), device=flat.device)
            flat = torch.cat([flat[idx], flat.min()[None], flat.max()[None]])
        self._obs.append(flat.float())

    def finish_observing(self):
        obs, observer = getattr(self, "_obs", []), self._observer
        self.discard_observations()
        if observer is not None and not observer.empty:
            self._init_from_observer(observer)
        elif obs:
            self.initialize(torch.cat(obs))

    def spec(self) -> dict:
        return dict(self._spec, bits=self._b, signed=self._sgn)

    def num_qparam_values(self) -> int:
        return self.scale.numel() + (self.offset.numel() if self.offset is not None else 0)

    def quant_params(self) -> dict:
        if self._sgn is None:
            raise ConfigError("activation quantizer is not initialised yet: run slimtorch.calibrate "
                              "or one forward pass first")
        s = self.scale.detach().clamp_min(EPS)
        if self.integer_offset:
            z = self._zero_shift(s)
            z = int(z) if z.numel() == 1 else z
            return {"scale": s, "offset": None, "q_n": self.q_n + z, "q_p": self.q_p + z}
        return {"scale": s, "offset": None if self.offset is None else self.offset.detach(),
                "q_n": self.q_n, "q_p": self.q_p}
