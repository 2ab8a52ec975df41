"""The packed format description (packed.py), typed strictly, and its cross-checks against the
tensor index: run after the checksums and before any tensor is materialised or any quantizer is
built, so a hand-edited header cannot make the loader allocate more than the file holds.

Strict means: bool is not int, "yes" is not bool, ints are not floats (floats may be written as
ints), floats are finite, strings come from the known sets, no unknown keys. Every failure is a
CheckpointError "<file>: <field>: <problem>", e.g. ``layers[3].shape``."""
from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import CheckpointError
from .bitpack import packed_size
from .container import ITEMSIZE
from . import packed_pq as pq

BIG = 1 << 62                  # no count, dimension or byte total of a real file comes near it
KINDS = ("codes", "float", "masked", "codebook")
Count = Annotated[int, Field(ge=0, le=BIG)]
Shape = Annotated[list[Count], Field(max_length=16)]
Bytes = Count
Text = Annotated[str, Field(max_length=4096)]
Bits = Annotated[int, Field(ge=1, le=32)]
Role = Literal["weight", "activation"]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class LSQSpec(_Strict):
    type: Literal["LSQQuantizer"]
    bits: Annotated[int, Field(ge=1, le=8)]
    role: Role
    signed: bool
    learn_offset: bool
    scale_shape: Annotated[list[Count], Field(min_length=1, max_length=16)]
    init: Literal["lsq", "3sigma", "mse", "minmax", "percentile", "mse_hist", "entropy"]
    percentile: Optional[Annotated[float, Field(gt=0, le=100)]] = None
    narrow: bool
    use_grad_scale: bool
    integer_offset: bool = False

    def float_numel(self) -> int:
        return math.prod(self.scale_shape) * (2 if self.learn_offset else 1)


class UhlichSpec(_Strict):
    type: Literal["UniformQuantizer", "Pow2Quantizer"]
    parametrization: Literal["U1", "U2", "U3", "P1", "P2", "P3"]
    role: Role
    signed: bool
    bits: Bits
    init: Literal["float", "paper"]
    ranges: dict[Literal["b", "d", "qmax", "qmin"], Annotated[list[float], Field(min_length=2, max_length=2)]]
    bit_set: Optional[Annotated[list[Annotated[int, Field(ge=1, le=8)]], Field(min_length=1, max_length=8)]]
    clip_grads: bool
    bits_floor: Annotated[int, Field(ge=0, le=32)]
    with_zero: bool

    def float_numel(self) -> int:
        return 2                # every parametrization learns two scalars (uhlich.py, pow2.py)


SPEC_TYPES = ("LSQQuantizer", "UniformQuantizer", "Pow2Quantizer")


class Buffers(_Strict):
    initialized: Literal[True] = Field(None, alias="_initialized")     # absent: None (not initialised)


class QuantEntry(_Strict):
    spec: Annotated[Union[LSQSpec, UhlichSpec], Field(discriminator="type")]
    buffers: Buffers = Buffers()


class Layer(_Strict):
    name: Text
    module: Text
    shape: Annotated[list[Count], Field(min_length=1, max_length=16)]
    kind: Text
    bits: Bits
    wq: Optional[Count] = None
    aq: Optional[Count] = None
    bias: Count = 0
    int32_bias: bool = False
    aq_shared: Optional[Text] = None
    kept: Optional[Count] = None                              # kind "masked": weights kept
    mask: Optional[Literal["bitmap", "index"]] = None         # kind "masked": how the mask is stored
    centroids: Optional[Count] = None                         # kind "codebook": K (packed_pq.py)
    block: Optional[Count] = None                             # kind "codebook": d
    int8: bool = False                                        # kind "codebook": int8 centroids + scale


class ZooBuild(_Strict):
    source: Literal["zoo"]
    name: Text
    kwargs: dict[str, Any] = {}


class HFBuild(_Strict):
    source: Literal["hf"]
    cls: Text = Field("", alias="class")
    config: dict[str, Any]


class Theory(_Strict):
    bytes: Annotated[int, Field(gt=0, le=BIG)]
    fp32_bytes: Annotated[int, Field(gt=0, le=BIG)]
    params: Count = 0


class Meta(_Strict):
    format: str
    version: int
    model: Text
    build: Optional[Annotated[Union[ZooBuild, HFBuild], Field(discriminator="source")]] = None
    quantizers: list[QuantEntry]
    layers: list[Layer]
    state: dict[Literal[tuple(ITEMSIZE)], list[tuple[Text, Shape]]]
    costs: list[Union[tuple[Text, Bytes, Optional[Bits]],                       # v2 quantized layer
                      tuple[Text, Bytes, Text, Count],                          # v2 float layer
                      tuple[Text, Text, Count, Bits, Optional[Bits], Bytes]]]   # v1
    theory: Theory
    crc32: Annotated[str, Field(pattern="^[0-9a-f]*$")]
    split_mha: Optional[Annotated[list[Text], Field(max_length=100_000)]] = None   # MHA split into Linears
    folded_bn: Optional[Annotated[list[tuple[Text, Text]], Field(max_length=100_000)]] = None   # BN folds
    shrunk: Optional[Annotated[list[tuple[Text, Literal["heads", "neurons"], Count,
                                          Annotated[list[Count], Field(max_length=1_000_000)]]],
                               Field(max_length=100_000)]] = None   # shrink_ records


_NOISE = {"int", "float", "str", "bool", "none", *SPEC_TYPES, "zoo", "hf"}


def _where(loc) -> str:
    """``("layers", 3, "shape")`` -> ``layers[3].shape`` (union member names dropped)."""
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p not in _NOISE and "[" not in p and "-" not in p:
            out += f".{p}" if out else p
    return out or "(top level)"


class _Checks:
    """Cross-checks of a schema-valid description against the tensor index (name -> entry)."""

    def __init__(self, m: Meta, index: dict, path):
        self.m, self.index, self.path, self.used = m, index, path, set()

    def fail(self, field: str, msg: str):
        raise CheckpointError(f"{self.path}: {field}: {msg}")

    def tensor(self, name: str, field: str, dtype: str | None = None) -> int:
        """Element count of tensor ``name`` (which must exist, with ``dtype`` if given)."""
        e = self.index.get(name)
        if e is None:
            self.fail(field, f"header entry names tensor {name!r}, which the file does not contain")
        if dtype is not None and e["dtype"] != dtype:
            self.fail(field, f"tensor {name} has dtype {e['dtype']}, expected {dtype}")
        self.used.add(name)
        return math.prod(e["shape"])

    def quantizer(self, e: Layer, i: int, key: str, role: str):
        j, table = getattr(e, key), self.m.quantizers
        if j is None:
            return None
        if j >= len(table):
            self.fail(f"layers[{i}].{key}", f"layer {e.name!r} refers to quantizer {j}, the header lists {len(table)}")
        if table[j].spec.role != role:
            self.fail(f"layers[{i}].{key}", f"quantizer {j} is a {table[j].spec.role} quantizer, expected {role}")
        return table[j]

    def layer(self, i: int, e: Layer, seen: dict) -> int:
        """Check one layer entry; returns how many float32 params it stores."""
        f = f"layers[{i}]"
        if e.name in seen:
            self.fail(f"{f}.name", f"layer {e.name!r} appears twice")
        if e.kind not in KINDS:
            self.fail(f"{f}.kind", f"layer {e.name!r} has kind {e.kind!r}, which this slimtorch cannot load "
                                   f"(known: {', '.join(KINDS)})")
        wq, aq = self.quantizer(e, i, "wq", "weight"), self.quantizer(e, i, "aq", "activation")
        if aq is not None and not aq.buffers.initialized:
            self.fail(f"quantizers[{e.aq}].buffers", "input quantizer is not initialised (no _initialized)")
        if e.aq_shared is not None and (e.aq_shared not in seen or seen[e.aq_shared].aq != e.aq or e.aq is None):
            self.fail(f"{f}.aq_shared", f"{e.aq_shared!r} is not an earlier layer with the same input quantizer")
        n, extra = math.prod(e.shape), 0
        pq.check_fields(self, i, e)
        if (e.kind == "masked") != (e.kept is not None) or (e.kind == "masked") != (e.mask is not None):
            self.fail(f"{f}.kind", f"layer {e.name!r}: 'kept' and 'mask' go with kind 'masked' only, and it needs both")
        if e.kind == "masked":
            if wq is None or e.bits > 8:
                self.fail(f"{f}.wq" if wq is None else f"{f}.bits",
                          f"layer {e.name!r}: a 'masked' layer needs a weight quantizer and 1..8 bits")
            if not 1 <= e.kept <= n:
                self.fail(f"{f}.kept", f"layer {e.name!r} keeps {e.kept} of {n} weights")
            got, need = self.tensor(f"{e.name}.w_codes", f, "U8"), packed_size(e.kept, e.bits)
            if got != need:
                self.fail(f"{f}.kept", f"tensor {e.name}.w_codes holds {got} uint8 values; {e.kept} kept weights "
                                       f"at {e.bits} bits need {need}")
            key = f"{e.name}.mask" if e.mask == "bitmap" else f"{e.name}.mask_index"
            got, need = self.tensor(key, f"{f}.mask", "U8"), self.mask_size(e)
            if got != need:
                self.fail(f"{f}.mask", f"tensor {key} holds {got} bytes; the {e.mask} of {e.kept} of {n} "
                                       f"weights needs {need}")
        elif e.kind == pq.KIND:
            extra = pq.check_entry(self, i, e)
        elif e.kind == "codes":
            if wq is None or e.bits > 8:
                self.fail(f"{f}.wq" if wq is None else f"{f}.bits",
                          f"layer {e.name!r}: a 'codes' layer needs a weight quantizer and 1..8 bits")
            got, need = self.tensor(f"{e.name}.w_codes", f, "U8"), packed_size(n, e.bits)
            if got != need:
                self.fail(f"{f}.shape", f"tensor {e.name}.w_codes holds {got} uint8 values; {n} weights at "
                                        f"{e.bits} bits need {need} uint8 bytes")
        else:
            if wq is not None or e.bits != 32:
                self.fail(f"{f}.wq", f"layer {e.name!r}: a 'float' layer has no weight quantizer and 32 bits")
            self.tensor(f"{e.name}.weight", f)
            if self.index[f"{e.name}.weight"]["shape"] != e.shape:
                self.fail(f"{f}.shape", f"layer {e.name!r} weight shape {self.index[e.name + '.weight']['shape']} "
                                        f"does not match the header's {e.shape}")
        if wq is not None and isinstance(wq.spec, LSQSpec):
            self.scale_fits(f"quantizers[{e.wq}].spec.scale_shape", wq.spec.scale_shape, list(e.shape))
        if aq is not None and isinstance(aq.spec, LSQSpec) and not self.input_scale_fits(aq.spec.scale_shape, e.shape):
            self.fail(f"quantizers[{e.aq}].spec.scale_shape", "an input quantizer has one step (per tensor) or "
                      f"one per input channel of the layer (weight shape {e.shape}), got {aq.spec.scale_shape}")
        seen[e.name] = e
        return e.bias + extra + sum(q.spec.float_numel() for q in (wq, aq) if q is not None)

    @staticmethod
    def mask_size(e: Layer) -> int:
        from ..cost import index_bytes
        n = math.prod(e.shape)
        return (n + 7) // 8 if e.mask == "bitmap" else e.kept * index_bytes(n)

    @staticmethod
    def input_scale_fits(scale: list, shape: list) -> bool:
        """Per tensor, or per input channel (quant/model_input.py): [in] for a Linear weight [out, in],
        [1, C, 1, ...] for a conv weight [out, C / groups, k, ...]."""
        if math.prod(scale) == 1:
            return len(scale) in (1, len(shape))          # no extra axis for the input to grow
        if len(shape) == 2 and scale == [shape[1]]:
            return True
        return (len(scale) == len(shape) > 2 and scale[0] == 1 and all(v == 1 for v in scale[2:])
                and scale[1] % max(shape[1], 1) == 0)

    def scale_fits(self, field: str, scale: list, shape: list) -> None:
        """A weight step is per tensor ([1]) or per output channel ([out, 1, ...], one axis per dim)."""
        per_channel = len(scale) == len(shape) and scale[0] == shape[0] and all(v == 1 for v in scale[1:])
        if scale != [1] and not per_channel:
            self.fail(field, f"{scale} fits neither per-tensor [1] nor per-channel "
                             f"{[shape[0]] + [1] * (len(shape) - 1) if shape else '[out, 1, ...]'} for weight shape {shape}")

    def params(self, sizes: list):
        m = self.m
        if m.version >= 2:              # one pooled tensor
            if sum(sizes) or "params" in self.index:
                got = self.tensor("params", "layers", "F32")
                for j, q in enumerate(m.quantizers):
                    if q.spec.float_numel() > got:
                        field = "scale_shape" if isinstance(q.spec, LSQSpec) else "type"
                        self.fail(f"quantizers[{j}].spec.{field}", f"asks for {q.spec.float_numel()} float "
                                                                   f"values, the file stores {got} in all")
                if got != sum(sizes):
                    self.fail("layers", f"tensor params holds {got} values, its header entries need {sum(sizes)}")
            return
        for i, (e, n) in enumerate(zip(m.layers, sizes)):
            if n or f"{e.name}.params" in self.index:
                got = self.tensor(f"{e.name}.params", f"layers[{i}]", "F32")
                if got != n:
                    self.fail(f"layers[{i}]", f"tensor {e.name}.params holds {got} values, the entry needs {n}")

    def state(self, layer_keys: set):
        seen = set()
        for code, keys in self.m.state.items():
            got, need = self.tensor(f"state.{code}", f"state.{code}", code), sum(math.prod(s) for _, s in keys)
            if got != need:
                self.fail(f"state.{code}", f"tensor state.{code} holds {got} values, its header entries need {need}")
            for i, (k, _) in enumerate(keys):
                if k in seen or k in layer_keys or k in self.index:
                    self.fail(f"state.{code}[{i}]", f"state key {k!r} appears twice or names a tensor")
                seen.add(k)

    def costs(self, layers: dict):
        """Rows fit the layers; bytes and params agree with the entries (where the quantizers
        are LSQ) and bound the theory totals (cost.py model_costs)."""
        m, seen, rows_bytes, rows_params = self.m, set(), 0, 0
        for i, r in enumerate(m.costs):
            ok = len(r) == 6 if m.version == 1 else (len(r) == 3) == (r[0] in layers) and len(r) < 6
            if not ok or r[0] in seen:
                self.fail(f"costs[{i}]", f"row {list(r)!r} does not fit the layers (or repeats a name)")
            seen.add(r[0])
            nbytes, params, want = (r[5], r[2], None) if len(r) == 6 else (r[1], r[3], 4 * r[3]) if len(r) == 4 \
                else (r[1], *self.layer_cost(i, layers[r[0]], r[2]))
            if want is not None and nbytes != want:
                self.fail(f"costs[{i}][1]", f"{nbytes} bytes for layer {r[0]!r}, its entry gives {want}")
            rows_bytes, rows_params = rows_bytes + nbytes, rows_params + params
        if m.version >= 2 and not set(layers) <= seen:
            self.fail("costs", f"layers {sorted(set(layers) - seen)[:5]} have no cost row")
        state_numel = sum(math.prod(s) for keys in m.state.values() for _, s in keys)
        state_bytes = sum(math.prod(s) * ITEMSIZE[c] for c, keys in m.state.items() for _, s in keys)
        t = m.theory
        for field, value, lo, hi in (("bytes", t.bytes, rows_bytes, rows_bytes + state_bytes),
                                     ("fp32_bytes", t.fp32_bytes, 0, 4 * (rows_params + state_numel) + state_bytes),
                                     ("params", t.params, 0, rows_params + state_numel)):
            if not lo <= value <= hi and field in t.model_fields_set:
                self.fail(f"theory.{field}", f"{value} is outside {lo}..{hi}, what the costs and state allow")

    def layer_cost(self, i: int, e: Layer, a_bits) -> tuple:
        """(params, theoretical bytes or None when not checkable) of quantized layer ``e``'s row i."""
        qs = [self.m.quantizers[j].spec for j in (e.wq, e.aq) if j is not None]
        if (a_bits is None) != (e.aq is None) or (e.aq is not None and isinstance(qs[-1], LSQSpec)
                                                  and qs[-1].bits != a_bits):
            self.fail(f"costs[{i}][2]", f"activation bits {a_bits!r} do not match layer {e.name!r}")
        n = math.prod(e.shape)
        exact = all(isinstance(q, LSQSpec) for q in qs)
        codes = packed_size(n, e.bits) if e.kind != "masked" else packed_size(e.kept, e.bits) + self.mask_size(e)
        if e.kind == pq.KIND:
            codes = pq.entry_bytes(e)
        return n + e.bias, codes + 4 * (e.bias + sum(q.float_numel() for q in qs)) if exact else None

    def run(self) -> list:
        m, seen = self.m, {}
        sizes = [self.layer(i, e, seen) for i, e in enumerate(m.layers)]
        unused = set(range(len(m.quantizers))) - {j for e in m.layers for j in (e.wq, e.aq) if j is not None}
        if unused:
            self.fail(f"quantizers[{min(unused)}]", "no layer uses this quantizer")
        self.params(sizes)
        self.state({f"{e.name}.params" for e in m.layers})
        self.costs(seen)
        if len(m.crc32) != 8 * len(self.index):
            self.fail("crc32", f"{len(m.crc32)} hex digits for {len(self.index)} tensors")
        extra = sorted(set(self.index) - self.used)
        if extra:
            self.fail("layers", f"tensor {extra[0]!r} is not described by the header")
        return sizes


def check_meta(meta: dict, index: dict, path) -> list:
    """Validate the decoded description ``meta`` against the schema and the tensor ``index``;
    returns the float32 param count of each layer (to split the pooled tensor)."""
    try:
        m = Meta.model_validate_json(json.dumps(meta), strict=True)
    except ValidationError as err:
        e = err.errors(include_url=False)[0]
        got = "" if e["type"] == "missing" else f" (got {repr(e['input'])[:60]})"
        raise CheckpointError(f"{path}: {_where(e['loc'])}: {e['msg']}{got}") from None
    return _Checks(m, index, path).run()
