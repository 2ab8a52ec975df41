"""Pruning (Sanh, Wolf & Rush 2020, "Movement Pruning"): magnitude, hard and soft movement masks
as weight transforms, unstructured or structured (blocks, rows, columns, heads, FFN neurons), the
cubic schedule, the verbs, and ``shrink_`` (removes pruned heads and neurons)."""
from .api import (PRUNABLE, advance_, apply_masks_, layer_masks, masks_of, prune_, prune_param_groups,
                  pruned_layers, soft_penalty, sparsity)
from .binarize import global_threshold, min_kept, threshold_mask, topk_mask
from .configs import HardMovement, Magnitude, PruneConfig, SoftMovement, TopKConfig
from .mask import HardMovementMask, MagnitudeMask, Mask, SoftMovementMask
from .schedule import cubic_value, regularization_lambda
from .shrink import shrink_
from .sites import find_sites
from .structure import STRUCTURES, Grouping

__all__ = ["prune_", "pruned_layers", "advance_", "soft_penalty", "prune_param_groups", "layer_masks",
           "sparsity", "apply_masks_", "masks_of", "PRUNABLE", "global_threshold", "min_kept",
           "threshold_mask", "topk_mask", "HardMovement", "Magnitude", "PruneConfig", "SoftMovement",
           "TopKConfig", "HardMovementMask", "MagnitudeMask", "Mask", "SoftMovementMask", "cubic_value",
           "regularization_lambda", "shrink_", "find_sites", "STRUCTURES", "Grouping"]
