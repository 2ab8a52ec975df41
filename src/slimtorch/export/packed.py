"""``save_packed`` / ``load_packed``: the deployable slimtorch file (container.py holds the bytes).

Format text (JSON in the safetensors metadata, key "slimtorch.packed", stored zlib-compressed and
base64-encoded by container.py):

    format "slimtorch.packed", version 2, model (class name, informational), build (optional:
    how to rebuild the float architecture, see modelspec.py)
    quantizers  [{"spec": Quantizer.spec(), "buffers": {non-float buffers that differ from a
                freshly built quantizer}}, ...], deduplicated, referenced by index
    layers      [entry, ...] one per layer with a quantizer, in module order:
        name, module ("Linear" | "Conv1d" | "Conv2d" | "Embedding" | class name), shape (weight),
        bits, wq / aq (quantizer index, aq absent = float input), bias (number of bias values),
        kind  "codes": tensor <name>.w_codes (U8) = encode(W) bit-packed at ``bits``
                       (bitpack.py); W = decode(codes) with the rebuilt weight quantizer
              "float": tensor <name>.weight holds W (a layer with only an input quantizer)
              "masked": a pruned layer (prune/, Sanh et al. 2020) stored sparse where that is
                       smaller than dense codes (cost.stores_sparse): ``kept`` weights, ``mask``
                       "bitmap" (tensor <name>.mask, U8, ceil(n / 8) bytes, bit i = flat weight i,
                       bitpack.py at 1 bit) or "index" (tensor <name>.mask_index, U8: the kept flat
                       indices, increasing, little-endian at cost.index_bytes(n) bytes each),
                       whichever cost.mask_bytes picks, and <name>.w_codes = the kept weights' codes
                       only (flat order) packed at ``bits``; a pruned weight's code is the encoded 0
              "codebook": product quantization (packed_pq.py): <name>.codebook [K, d] F32 (or I8,
                          ``int8``: its scale first in params after the bias) + <name>.w_codes =
                          the codes packed at ``bits`` = ceil(log2 K); ``centroids`` K, ``block`` d
    params      (tensor, F32) per layer in ``layers`` order: its bias, then the weight quantizer's
                float state, then the input quantizer's, each in state_dict order with the shapes
                the rebuilt quantizers have (so the per-layer lengths follow from the header)
    state       {dtype: [[key, shape], ...]} the rest of model.state_dict() (norms, float layers,
                buffers), concatenated per dtype into tensor state.<dtype>
    costs       per quantizable layer in module order (cost.py, bytes as stored: cost.stored_bytes): [name, bytes, a_bits] for
                a layer in ``layers`` (kind, params and w_bits follow from its entry), [name, bytes,
                kind, params] for a float layer (in the state)
    theory      {bytes, fp32_bytes, params}: theoretical totals of ``model_costs`` (bytes: stored_bytes)
    folded_bn   (optional) [layer, bn] pairs whose BatchNorm is folded into the layer's stored weight
                and bias (quant/bn_fold.py); ``load_packed`` makes each bn an identity, each layer biased
    split_mha   (optional) names of the nn.MultiheadAttention modules whose projections were split
                into q/k/v_proj Linears (quant/mha.py); ``load_packed`` splits them in the fresh model
    shrunk      (optional) [owner, "heads"|"neurons", n, kept groups] of each block ``shrink_``
                shrank (prune/shrink.py); ``load_packed`` shrinks the fresh model the same way
    crc32       per-tensor CRC32s (container.py; the SHA-256 digests sit next to this text)

Version 1 (read, not written) stored the text as plain JSON, one <name>.params tensor per layer
and full cost rows [name, kind, params, w_bits, a_bits, bytes]."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..attach import add_weight_transform, bias_transforms, set_input_quantizer, transform_input, weight_transforms
from ..errors import CheckpointError, ConfigError
from ..quant.api import quantized_layers
from ..quant.bias import Int32Bias, attach_int32_bias
from ..quant.bn_fold import folded_pairs
from ..quant.bn_qat import BatchNormFold, FoldedWeight
from ..quant.quantizer import Quantizer, build_quantizer
from ..cost import cost_role, layer_cost, layer_kind, model_costs, stored_bytes, stores_sparse, weight_codebook, weight_mask
from .bitpack import pack_tensor, unpack_tensor
from .container import DTYPES, read_container, write_container
from .packed_masks import sparse_entry as _sparse, sparse_codes as _unsparse
from .packed_pq import attach_codebook, codebook_entry, decode_codebook, stored_layers
from .packed_schema import check_meta
from .packed_structure import restore_structure_, structure_meta

FORMAT, VERSION = "slimtorch.packed", 2
READ_VERSIONS = (1, 2)
RUNTIMES = ("float", "fakequant", "int8")


def _rebuild(entry: dict, what: str) -> Quantizer:
    try:
        q = build_quantizer(entry["spec"])
    except Exception as e:  # unknown type, bad arguments
        raise CheckpointError(f"{what}: cannot rebuild quantizer from spec {entry.get('spec')}: {e}") from None
    if entry.get("buffers"):
        sd = q.state_dict()
        for k, v in entry["buffers"].items():
            if k not in sd:
                raise CheckpointError(f"{what}: quantizer has no buffer {k!r}")
            sd[k] = torch.tensor(v, dtype=sd[k].dtype).reshape(sd[k].shape)
        q.load_state_dict(sd)
    return q


def _float_keys(q: Quantizer) -> list:
    return [(k, v.shape) for k, v in q.state_dict().items() if v.is_floating_point()]


def _layer_keys(name: str, sd_keys) -> set:
    p = f"{name}." if name else ""
    return {k for k in sd_keys if k in (p + "weight", p + "bias")
            or k.startswith(p + "parametrizations.weight.") or k.startswith(p + "parametrizations.bias.")
            or k.startswith(p + "input_quantizer.")}


def _f32(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype != torch.float32:
        raise ConfigError(f"{what} is {t.dtype}: the packed format stores float32 parameters")
    return t.detach().reshape(-1)


def save_packed(model: nn.Module, path, build: dict | None = None) -> dict:
    """Write ``model`` (with quantizers attached by ``quantize_``) as one packed file.

    ``build`` (optional, JSON-able) records how to rebuild the float architecture, so that
    ``load_packed(path)`` and the CLI need no factory: {"source": "zoo", "name", "kwargs"} or
    {"source": "hf", "config": {...}} (modelspec.py; ``build="auto"`` detects HF models).
    Quant-Noise transforms (pq/noise.py) still attached are left out: they are identity in eval
    and store nothing (the file holds what the model computes in eval mode).
    Returns {"path", "file_bytes", "theoretical_bytes", "fp32_bytes"}."""
    from ..pq.noise import noise_off
    with noise_off(model), torch.no_grad():
        return _save_packed(model, path, build)


def _save_packed(model: nn.Module, path, build: dict | None) -> dict:
    if build == "auto":
        from .modelspec import build_spec
        build = build_spec(model)
    table, layers, tensors, pooled, taken = [], [], {}, [], set()
    from ..pq.noise import float_noise_keys
    sd = float_noise_keys(model, model.state_dict(), {n for n, *_ in quantized_layers(model)})

    def index_of(q: Quantizer, what: str) -> int:
        fresh = _rebuild({"spec": q.spec()}, what).state_dict()
        bufs = {k: v.tolist() for k, v in q.state_dict().items() if not v.is_floating_point()
                and (k not in fresh or not torch.equal(fresh[k], v.cpu()))}
        entry = {"spec": q.spec(), **({"buffers": bufs} if bufs else {})}
        if entry not in table:
            table.append(entry)
        return table.index(entry)

    folds = folded_pairs(model)        # BatchNorm folded into layers: stored folded, BN left out
    qat_folds = {n for n, m in model.named_modules() if isinstance(m, BatchNormFold)}
    quantized = {n for n, *_ in quantized_layers(model)}
    for layer_name, bn_name in folds:
        if bn_name in qat_folds and layer_name not in quantized:
            raise ConfigError(f"layer {layer_name!r} has a train-time BatchNorm fold but no quantizer: "
                              "fold it with fold_batchnorm_(train=False) to save it")
    taken |= {k for k in sd if any(k.startswith(b + ".") for b in qat_folds)}
    first_user: dict[int, str] = {}     # input quantizer object -> first layer using it
    quantized_names = {n for n, *_ in quantized_layers(model)}
    for name, m in model.named_modules():
        if name not in quantized_names and weight_mask(m) is not None and weight_codebook(m) is None:
            raise ConfigError(f"layer {name!r} has a pruning mask but no quantizer: the packed format "
                              "stores masks with quantized codes only; quantize the layer or "
                              "materialise the mask first with slimtorch.apply_masks_(model)")
    for name, m, wq, aq in stored_layers(model):
        w, bias = m.weight, getattr(m, "bias", None)
        entry = {"name": name, "module": layer_kind(m), "shape": list(w.shape)}
        params = [] if bias is None else [_f32(bias, f"{name}.bias")]
        if weight_codebook(m) is not None:      # product quantization: codes + centroids (packed_pq.py)
            params += codebook_entry(name, m, wq, entry, tensors)
        elif wq is not None:
            chain = weight_transforms(m)
            # a BN fold: the codes are of W_fold; a pruning mask before the quantizer: the codes are
            # of W * M, stored sparse (mask + kept codes) where that is smaller (_sparse)
            others = [type(t).__name__ for i, t in enumerate(chain) if t is not wq
                      and not isinstance(t, FoldedWeight) and cost_role(t) != "noise"
                      and not (cost_role(t) == "mask" and i < chain.index(wq))]
            if others:
                raise ConfigError(f"layer {name!r}: weight transforms {others} are not supported by "
                                  f"packed format version {VERSION}")
            codes = wq.encode(transform_input(m, wq))
            entry.update(kind="codes", bits=wq.bits, wq=index_of(wq, name))
            rebuilt = _rebuild(table[entry["wq"]], name).to(w.device)
            rebuilt.load_state_dict(wq.state_dict())
            if not torch.equal(rebuilt.decode(codes).to(w.dtype), w):
                raise ConfigError(f"layer {name!r}: {type(wq).__name__}.decode(encode(W)) does not "
                                  "reproduce the fake-quantized weight; cannot pack it exactly")
            if stores_sparse(layer_cost(name, m)):
                _sparse(name, m, wq, codes, entry, tensors)
            else:
                tensors[f"{name}.w_codes"] = pack_tensor(codes, wq.bits)
            params += [_f32(v, f"{name} weight quantizer {k}") for k, v in wq.state_dict().items()
                       if v.is_floating_point()]
        else:
            entry.update(kind="float", bits=32)
            tensors[f"{name}.weight"] = w.detach()
        entry["bias"] = 0 if bias is None else bias.numel()
        if any(isinstance(t, Int32Bias) for t in bias_transforms(m)):
            entry["int32_bias"] = True          # the stored bias is already on the int32 grid
        if aq is not None:
            if getattr(aq, "initialized", True) is False:
                raise ConfigError(f"layer {name!r}: input quantizer is not initialised; run "
                                  "slimtorch.calibrate or a forward pass before saving")
            entry["aq"] = index_of(aq, name)
            if id(aq) in first_user:          # share_input_quantizers: one object, restored on load
                entry["aq_shared"] = first_user[id(aq)]
            first_user.setdefault(id(aq), name)
            params += [_f32(v, f"{name} input quantizer {k}") for k, v in aq.state_dict().items()
                       if v.is_floating_point()]
        pooled += params
        layers.append(entry)
        taken |= _layer_keys(name, sd)
    if pooled:
        tensors["params"] = torch.cat(pooled)
    state: dict = {}
    for k in sd:
        if k not in taken:
            if sd[k].dtype not in DTYPES:
                raise ConfigError(f"state {k!r} has dtype {sd[k].dtype}, which the format cannot store")
            state.setdefault(DTYPES[sd[k].dtype], []).append([k, list(sd[k].shape)])
    for code, keys in state.items():
        tensors[f"state.{code}"] = torch.cat([sd[k].detach().reshape(-1) for k, _ in keys])
    costs = model_costs(model)
    names = {e["name"] for e in layers}
    meta = {"format": FORMAT, "version": VERSION, "model": type(model).__name__,
            **({"build": build} if build else {}), **structure_meta(model, folds),
            "quantizers": table, "layers": layers, "state": state,
            "costs": [[r.name, stored_bytes(r), r.a_bits] if r.name in names else [r.name, r.bytes, r.kind, r.params]
                      for r in costs["layers"]],
            "theory": {"bytes": costs["stored_bytes"], "fp32_bytes": costs["fp32_bytes"], "params": costs["params"]}}
    size = write_container(path, tensors, meta)
    return {"path": str(path), "file_bytes": size, "theoretical_bytes": costs["stored_bytes"],
            "fp32_bytes": costs["fp32_bytes"]}


def _split(blob: torch.Tensor, shapes: list, what: str, path) -> list:
    need = sum(math.prod(s) for s in shapes)
    if blob.numel() != need:
        raise CheckpointError(f"{path}: tensor {what} holds {blob.numel()} values, its header entries "
                              f"need {need}")
    out, i = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(blob[i:i + n].reshape(s))
        i += n
    return out


def read_packed(path) -> tuple[dict, dict, dict]:
    """Read and verify a packed file: (meta, tensors, index). The description is checked strictly
    (packed_schema.py) before any tensor is materialised; the pooled params and the state are
    returned split into their named tensors (tensors[key])."""
    sizes: list = []
    meta, tensors, index = read_container(path, check=lambda m, idx: sizes.extend(check_meta(m, idx, path)))
    if meta["version"] >= 2 and "params" in tensors:
        parts = _split(tensors["params"], [(n,) for n in sizes], "params", path)
        tensors.update({f"{e['name']}.params": t for e, t in zip(meta["layers"], parts) if t.numel()})
    for code, keys in meta["state"].items():
        parts = _split(tensors[f"state.{code}"].reshape(-1), [tuple(s) for _, s in keys], f"state.{code}", path)
        tensors.update({k: t for (k, _), t in zip(keys, parts)})
    return meta, tensors, index


def cost_rows(meta: dict) -> list:
    """[name, kind, params, w_bits, a_bits, theoretical bytes] per quantizable layer, module order
    (version 2 stores only what the layer entries do not say)."""
    if meta["version"] == 1:
        return [list(r) for r in meta["costs"]]
    layers = {e["name"]: e for e in meta["layers"]}
    return [[r[0], e["module"], math.prod(e["shape"]) + e.get("bias", 0), e["bits"], r[2], r[1]]
            if (e := layers.get(r[0])) is not None else [r[0], r[2], r[3], 32, None, r[1]]
            for r in meta["costs"]]


def _decode_layer(e, m, table, tensors, path):
    """(weight, bias, weight quantizer, input quantizer, codes) of one layer entry, validated."""
    name = e["name"]
    wq, aq = (None if e.get(k) is None else _rebuild(table[e[k]], f"{path}: quantizers[{e[k]}]") for k in ("wq", "aq"))
    shapes = ([(e["bias"],)] if e.get("bias") else []) + ([(1,)] if e.get("int8") else []) \
        + [s for q in (wq, aq) if q for _, s in _float_keys(q)]
    parts = _split(tensors[f"{name}.params"].reshape(-1), shapes, f"{name}.params", path) if shapes else []
    bias = parts.pop(0) if e.get("bias") else None
    pq = decode_codebook(e, tensors, parts, path) if e["kind"] == "codebook" else None
    for q in (wq, aq):
        if q is not None:
            sd = q.state_dict()
            sd.update({k: parts.pop(0) for k, _ in _float_keys(q)})
            q.load_state_dict(sd)
    steps = getattr(getattr(aq, "scale", None), "numel", lambda: 1)()      # LSQ steps (Uhlich: none)
    if steps > 1 and steps != getattr(m, "in_channels", None):
        raise CheckpointError(f"{path}: layer {name!r}: its input quantizer has {steps} steps; "
                              f"per-channel input steps need one per input channel of a conv "
                              f"({type(m).__name__} has {getattr(m, 'in_channels', 'none')})")
    codes = None
    if e["kind"] in ("codes", "masked"):
        if wq.bits != e["bits"]:
            raise CheckpointError(f"{path}: layer {name!r} says {e['bits']} bits, its quantizer has {wq.bits}")
        codes = unpack_tensor(tensors[f"{name}.w_codes"], e["bits"], e["shape"]) if e["kind"] == "codes" \
            else _unsparse(e, wq, tensors, path)
        w = wq.decode(codes).to(m.weight.dtype)
    elif pq is not None:
        w, codes = pq[0].to(m.weight.dtype), pq[1:]     # codes: (centroids, codes) for attach_codebook
    else:
        w = tensors[f"{name}.weight"]
    return w, bias, wq, aq, codes


def _build_recorded(meta: dict, path) -> nn.Module:
    """The float model of the file's ``build`` record (modelspec.py)."""
    from .modelspec import build_from_spec
    if not meta.get("build"):
        raise ConfigError(f"{path} does not record how to build its model: pass a model factory")
    try:
        return build_from_spec(meta["build"])
    except Exception as e:  # the record names an unknown model or arguments it does not take
        raise CheckpointError(f"{path}: build: cannot build the recorded model: {e}") from None


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


@torch.no_grad()
def load_packed(path, model_or_factory=None, runtime: str = "float", pq_kernel: str = "auto",
                pq_batch: int = 1) -> nn.Module:
    """Load a packed file into a float model of the architecture it was saved from.

    ``model_or_factory``: a freshly built float nn.Module, or a callable returning one; None
    rebuilds it from the file's ``build`` record.
    ``runtime``: "float" (decoded weights + input quantizers: outputs bit-identical to the
    fake-quant model), "fakequant" (quantizers re-attached: trainable, reportable, re-savable) or
    "int8" (float, then Linear layers with <=8-bit weights and inputs on the int8 GEMM kernel).
    ``pq_kernel`` (float / int8): product-quantized Linear layers become runtime PQLinear on the
    LUT matmul ("lut"), the cached dense rebuild ("dense") or whichever is measured faster for the
    shape at ``pq_batch`` input rows ("auto"); "off" keeps dense nn.Linear (runtime/pq_convert.py)."""
    from ..runtime.pq_convert import check_pq_kernel, convert_pq
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime={runtime!r}; expected one of {RUNTIMES}")
    check_pq_kernel(pq_kernel, pq_batch)
    meta, tensors, _ = read_packed(path)
    if model_or_factory is None:
        model = _build_recorded(meta, path)
    else:
        model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory returned {type(model).__name__}, expected an nn.Module")
    if any(True for _ in stored_layers(model)):
        raise ConfigError("load_packed needs a float model (no quantizers attached): build a fresh one")
    restore_structure_(model, meta, path)
    sd, plan = model.state_dict(), []
    int32_bias = {e["name"]: bool(e.get("int32_bias")) for e in meta["layers"]}
    shared_aq = {e["name"]: e["aq_shared"] for e in meta["layers"] if e.get("aq_shared")}
    for e in meta["layers"]:       # validate and decode everything before touching the model
        name = e["name"]
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: the file has layer {name!r}, the model has no such module") from None
        if layer_kind(m) != e["module"] or not isinstance(getattr(m, "weight", None), torch.Tensor):
            raise CheckpointError(f"{path}: layer {name!r} is a {e['module']} in the file but a "
                                  f"{type(m).__name__} in the model")
        if list(m.weight.shape) != e["shape"]:
            raise CheckpointError(f"{path}: layer {name!r} weight shape {e['shape']} in the file, "
                                  f"{list(m.weight.shape)} in the model")
        b = getattr(m, "bias", None)
        if b is None and e.get("bias", 0) == e["shape"][0] and not isinstance(m, nn.Embedding):
            pass                   # a bias that calibration's bias correction added: created below
        elif (0 if b is None else b.numel()) != e.get("bias", 0):
            raise CheckpointError(f"{path}: layer {name!r} has {e.get('bias', 0)} bias values in the "
                                  f"file, {0 if b is None else b.numel()} in the model")
        plan.append((name, m, *_decode_layer(e, m, meta["quantizers"], tensors, path)))
    keys = [k for ks in meta["state"].values() for k, _ in ks]
    taken = set().union(*(_layer_keys(p[0], sd) for p in plan)) if plan else set()
    extra, missing = sorted(set(keys) - set(sd)), sorted(set(sd) - taken - set(keys))
    if extra or missing:
        raise CheckpointError(f"{path}: model state does not match the file: "
                              + (f"file keys not in the model {extra[:5]} " if extra else "")
                              + (f"model keys not in the file {missing[:5]}" if missing else ""))
    for k in keys:
        if tensors[k].shape != sd[k].shape:
            raise CheckpointError(f"{path}: state {k!r} has shape {list(tensors[k].shape)} in the "
                                  f"file, {list(sd[k].shape)} in the model")
    model.load_state_dict({k: tensors[k] for k in keys}, strict=False)
    loaded_aq = {}
    for name, m, w, bias, wq, aq, codes in plan:
        m.weight.copy_(w)
        if bias is not None:
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros_like(bias))
            m.bias.copy_(bias)
        if aq is not None:
            owner = shared_aq.get(name)
            if owner in loaded_aq and not _same_state(loaded_aq[owner], aq):
                raise CheckpointError(f"{path}: layer {name!r} shares the input quantizer of {owner!r} "
                                      "but stores different values for it")
            aq = loaded_aq[owner] if owner in loaded_aq else aq.to(m.weight.device)
            loaded_aq[name] = aq
            set_input_quantizer(m, aq)
        if runtime == "fakequant" and wq is not None:
            add_weight_transform(m, wq.to(m.weight.device))
        if runtime == "fakequant" and isinstance(codes, tuple):
            attach_codebook(m, next(e for e in meta["layers"] if e["name"] == name), *codes)
        if runtime == "fakequant" and int32_bias.get(name):
            attach_int32_bias(m)
    if runtime != "fakequant":
        convert_pq(model, {p[0]: p[6] for p in plan if isinstance(p[6], tuple)}, pq_kernel, pq_batch)
    if runtime == "int8":
        from ..runtime.int8 import convert_int8
        convert_int8(model, {p[0]: (p[4], p[6]) for p in plan})
    return model.eval()
