"""Pruned layers in the packed file (kind "masked", packed.py): the mask as a bitmap or an index
list, whichever ``cost.mask_bytes`` picks, plus the quantized codes of the kept weights only (the
storage of movement-pruned models, Sanh, Wolf & Rush 2020, papers.md Sec. 5: PruneBERT's encoder
goes from 340 MB to 11 MB this way). A pruned weight is W * M = 0 before the quantizer (W' = Q(W * M)),
so its code is the encoded 0, which the loader restores: outputs are bit-exact."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..attach import transform_input
from ..cost import index_bytes, layer_cost, weight_mask
from ..errors import CheckpointError, ConfigError
from .bitpack import pack_tensor, unpack


def sparse_entry(name, m, wq, codes, entry, tensors) -> None:
    """A pruned layer's mask (bitmap or index list, cost.mask_bytes' choice) and kept codes."""
    mk = weight_mask(m)
    mask = mk.mask_for(transform_input(m, mk)).reshape(-1).cpu()
    flat, n, kept = codes.reshape(-1).cpu(), mask.numel(), int(mask.sum())
    zero = wq.encode(torch.zeros_like(transform_input(m, wq))).reshape(-1).cpu()
    if not torch.equal(flat[~mask], zero[~mask]):
        raise ConfigError(f"layer {name!r}: its pruned weights do not all encode as 0 (a transform between "
                          "the mask and the quantizer?); cannot store it sparse")
    row = layer_cost(name, m)
    entry.update(kind="masked", kept=kept, mask=row.mask_format)
    tensors[f"{name}.w_codes"] = pack_tensor(flat[mask], wq.bits)
    if row.mask_format == "bitmap":
        tensors[f"{name}.mask"] = pack_tensor(mask.to(torch.int64), 1)
    else:
        w = index_bytes(n)
        idx = mask.nonzero().reshape(-1).numpy().astype(f"<u{w}")
        tensors[f"{name}.mask_index"] = torch.from_numpy(idx.view(np.uint8).copy())


def sparse_codes(e: dict, wq, tensors, path) -> torch.Tensor:
    """The full code tensor of a "masked" layer entry: encoded 0 where pruned."""
    name, shape, kept = e["name"], e["shape"], e["kept"]
    n = math.prod(shape)
    if e["mask"] == "bitmap":
        mask = torch.from_numpy(unpack(tensors[f"{name}.mask"], 1, n).astype(bool))
        if int(mask.sum()) != kept:
            raise CheckpointError(f"{path}: layer {name!r}: its bitmap keeps {int(mask.sum())} weights, "
                                  f"the header says {kept}")
        idx = mask.nonzero().reshape(-1)
    else:
        w = index_bytes(n)
        idx = torch.from_numpy(tensors[f"{name}.mask_index"].numpy().view(f"<u{w}").astype(np.int64))
        if idx.numel() != kept or (idx.numel() and (idx[0] < 0 or idx[-1] >= n or (idx.diff() <= 0).any())):
            raise CheckpointError(f"{path}: layer {name!r}: mask_index is not {kept} increasing indices below {n}")
    zero = wq.encode(torch.zeros(shape)).reshape(-1).to(torch.int64)
    zero[idx] = torch.from_numpy(unpack(tensors[f"{name}.w_codes"], e["bits"], kept))
    return zero.reshape(shape)


__all__ = ["sparse_entry", "sparse_codes"]
