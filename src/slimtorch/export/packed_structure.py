"""The structure a packed file records beside its tensors, and its replay on a freshly built model
before the weights are loaded: nn.MultiheadAttention split into q/k/v_proj Linears (quant/mha.py),
attention heads and FFN neurons removed by ``shrink_`` (prune/shrink.py), BatchNorm folded into its
layer (quant/bn_fold.py). Replayed in that order: split, shrink, fold."""
from __future__ import annotations

from torch import nn

from ..errors import CheckpointError, ConfigError


def structure_meta(model: nn.Module, folds: list) -> dict:
    """The optional header keys ``split_mha``, ``shrunk`` and ``folded_bn`` of ``model``."""
    from ..prune.shrink import shrink_record
    from ..quant.mha import is_split
    split = [n for n, m in model.named_modules() if is_split(m)]
    shrunk = shrink_record(model)
    return {**({"split_mha": split} if split else {}), **({"shrunk": shrunk} if shrunk else {}),
            **({"folded_bn": [list(p) for p in folds]} if folds else {})}


def restore_structure_(model: nn.Module, meta: dict, path) -> None:
    """Give the fresh ``model`` the recorded structure (CheckpointError naming what does not fit)."""
    if meta.get("split_mha"):       # MultiheadAttention projections as Linears, as when saved
        from ..quant.mha import split_all_
        found = split_all_(model, set(meta["split_mha"]))
        if sorted(found) != sorted(meta["split_mha"]):
            raise CheckpointError(f"{path}: the file has MultiheadAttention modules "
                                  f"{sorted(set(meta['split_mha']) - set(found))} the model lacks")
    if meta.get("shrunk"):          # heads / FFN neurons removed by shrink_
        from ..prune.shrink import shrink_to_
        try:
            shrink_to_(model, meta["shrunk"])
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e}") from None
    if meta.get("folded_bn"):       # BatchNorm folded into layers: identities, layers with a bias
        from ..quant.bn_fold import apply_fold_structure_
        try:
            apply_fold_structure_(model, meta["folded_bn"])
        except (AttributeError, ConfigError) as e:
            raise CheckpointError(f"{path}: folded_bn: {e}") from None
