"""Product-quantized layers in the packed file (kind "codebook", packed.py; Stock et al. 2020,
papers.md Sec. 6a): the codes bit-packed at ceil(log2 K) bits and the K x d centroids, float32 or
int8 + one float32 scale (the scale sits in the pooled ``params`` right after the layer's bias).

Entry fields: ``bits`` = ceil(log2 K), ``centroids`` = K, ``block`` = d, ``int8`` (optional).
Tensors: <name>.w_codes (U8, the numel / d codes; at most 8 bits: bitpack.py; 9..16 bits: the low
bytes, then the high bits packed at bits - 8, ``codes_size``) and <name>.codebook ([K, d], F32 or
I8). The loader rebuilds W = C[codes] bit-exactly (int8: C = q * scale, as the forward computes).

What this version refuses, by name: a scalar weight quantizer or any transform stacked after the
codebook (W' = Q(C[codes])); transforms before it (a finished pruning mask) are absorbed in C."""
from __future__ import annotations

import math

import torch

from ..attach import input_quantizer, weight_transforms
from ..cost import weight_codebook, weight_quantizer
from ..errors import CheckpointError, ConfigError
from .bitpack import pack_tensor, packed_size, unpack_tensor

KIND = "codebook"


def stored_layers(model):
    """(name, module, weight quantizer, input quantizer) of every layer the file stores as an entry:
    quantized (a weight or input quantizer) or product-quantized, in module order."""
    for name, m in model.named_modules():
        wq, aq = weight_quantizer(m), input_quantizer(m)
        if wq is not None or aq is not None or weight_codebook(m) is not None:
            yield name, m, wq, aq


def codes_size(n: int, bits: int) -> int:
    """Bytes of ``n`` codes at ``bits`` (1..16): packed_size, or n low bytes + the high bits."""
    return packed_size(n, bits) if bits <= 8 else n + packed_size(n, bits - 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    c = codes.reshape(-1).to(torch.int64).cpu()
    if bits <= 8:
        return pack_tensor(c, bits)
    return torch.cat([pack_tensor(c & 0xFF, 8), pack_tensor(c >> 8, bits - 8)])


def unpack_codes(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits <= 8:
        return unpack_tensor(data, bits, (n,))
    return unpack_tensor(data[:n], 8, (n,)) | (unpack_tensor(data[n:], bits - 8, (n,)) << 8)


def codebook_entry(name: str, m, wq, entry: dict, tensors: dict) -> list:
    """Fill ``entry`` and ``tensors`` for product-quantized layer ``name``; returns its float32
    params after the bias (the int8 scale, or nothing)."""
    cb = weight_codebook(m)
    chain = weight_transforms(m)
    after = [type(t).__name__ for t in chain[chain.index(cb) + 1:]]
    if wq is not None or after:
        raise ConfigError(f"layer {name!r}: product quantization followed by {after} is not supported by "
                          "the packed format: use PQ(int8_centroids=True) for int8 centroids instead of a "
                          "scalar weight quantizer after the codebook")
    entry.update(kind=KIND, bits=cb.index_bits, centroids=cb.n_centroids, block=cb.block_size,
                 **({"int8": True} if cb.int8_centroids else {}))
    tensors[f"{name}.w_codes"] = pack_codes(cb.codes, cb.index_bits)
    if cb.int8_centroids:
        q, scale = cb.int8_state()
        tensors[f"{name}.codebook"] = q.cpu()
        params = [scale.detach().float().reshape(1).cpu()]
    else:
        tensors[f"{name}.codebook"] = cb.centroids.detach().float().cpu()
        params = []
    w = rebuild(entry, tensors[f"{name}.codebook"], params[0] if params else None,
                unpack_codes(tensors[f"{name}.w_codes"], cb.index_bits, cb.codes.numel()))
    if not torch.equal(w.to(m.weight.dtype), m.weight.detach().cpu()):
        raise ConfigError(f"layer {name!r}: the stored codebook does not reproduce the layer's weight; "
                          "cannot pack it exactly")
    return params


def rebuild(e: dict, table: torch.Tensor, scale, codes: torch.Tensor) -> torch.Tensor:
    """W = C[codes] reshaped to the entry's shape (C = int8 table * scale when ``int8``)."""
    c = table.float() * scale if e.get("int8") else table.float()
    return c[codes.long()].reshape(e["shape"])


def decode_codebook(e: dict, tensors: dict, parts: list, path=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense weight, centroids as the forward used them, codes) of a "codebook" entry; pops the
    int8 scale from ``parts`` (the layer's params after its bias)."""
    name, n = e["name"], math.prod(e["shape"]) // e["block"]
    scale = parts.pop(0).reshape(()) if e.get("int8") else None
    codes = unpack_codes(tensors[f"{name}.w_codes"], e["bits"], n)
    if n and int(codes.max()) >= e["centroids"]:
        raise CheckpointError(f"{path}: layer {name!r}: code {int(codes.max())} in w_codes, the codebook has "
                              f"{e['centroids']} centroids")
    table = tensors[f"{name}.codebook"]
    centroids = table.float() * scale if e.get("int8") else table.float()
    return rebuild(e, table, scale, codes), centroids, codes


def attach_codebook(m, e: dict, centroids: torch.Tensor, codes: torch.Tensor) -> None:
    """Runtime "fakequant": the Codebook transform again (trainable, reportable, re-savable)."""
    from ..attach import add_weight_transform
    from ..pq.codebook import Codebook
    from ..pq.kmeans import code_dtype
    cb = Codebook(centroids.to(m.weight.dtype), codes.to(code_dtype(e["centroids"])), e["shape"], bool(e.get("int8")))
    add_weight_transform(m, cb.to(m.weight.device))


def check_entry(chk, i: int, e) -> int:
    """Schema cross-checks of a "codebook" entry ``e`` (packed_schema._Checks ``chk``); returns the
    float32 params it stores besides bias and input quantizer (1 for the int8 scale)."""
    from ..pq.kmeans import MAX_CENTROIDS, code_bits
    f, n = f"layers[{i}]", math.prod(e.shape)
    if e.wq is not None:
        chk.fail(f"{f}.wq", f"layer {e.name!r}: a 'codebook' layer has no weight quantizer")
    if e.centroids is None or e.block is None or not 1 <= e.centroids <= MAX_CENTROIDS or e.block < 1 \
            or n % e.block:
        chk.fail(f"{f}.centroids", f"layer {e.name!r}: a 'codebook' layer needs centroids in 1..{MAX_CENTROIDS} "
                                   f"and a block that divides its {n} weights")
    if e.bits != code_bits(e.centroids):
        chk.fail(f"{f}.bits", f"layer {e.name!r}: {e.centroids} centroids take {code_bits(e.centroids)} bits, "
                              f"the entry says {e.bits}")
    got, need = chk.tensor(f"{e.name}.w_codes", f, "U8"), codes_size(n // e.block, e.bits)
    if got != need:
        chk.fail(f"{f}.shape", f"tensor {e.name}.w_codes holds {got} bytes; {n // e.block} codes at {e.bits} "
                               f"bits need {need}")
    got = chk.tensor(f"{e.name}.codebook", f"{f}.centroids", "I8" if e.int8 else "F32")
    if chk.index[f"{e.name}.codebook"]["shape"] != [e.centroids, e.block]:
        chk.fail(f"{f}.centroids", f"tensor {e.name}.codebook has shape {chk.index[e.name + '.codebook']['shape']}, "
                                   f"expected {[e.centroids, e.block]}")
    return 1 if e.int8 else 0


def entry_bytes(e) -> int:
    """The cost module's count of a "codebook" entry's codes + centroids (cost.codebook_bytes)."""
    from ..cost import codebook_bytes
    return sum(codebook_bytes(math.prod(e.shape), e.centroids, e.block, bool(e.int8)))


def check_fields(chk, i: int, e) -> None:
    if (e.kind == KIND) != (e.centroids is not None) or (e.kind == KIND) != (e.block is not None) \
            or (e.int8 and e.kind != KIND):
        chk.fail(f"layers[{i}].kind", f"layer {e.name!r}: 'centroids', 'block' and 'int8' go with kind "
                                      f"'{KIND}' only, and it needs the first two")


__all__ = ["KIND", "stored_layers", "codes_size", "pack_codes", "unpack_codes", "codebook_entry", "rebuild",
           "decode_codebook", "attach_codebook", "check_entry", "entry_bytes", "check_fields"]
