"""Structured masks: one score (or one magnitude) per group of weights instead of per weight.

The structured variants of movement pruning (Sanh, Wolf & Rush 2020, papers.md Sec. 5; the block
extension of huggingface/nn_pruning; NNCF's "block" / "per_dim" movement masks) keep the same
binarizers (top-k, threshold, at least 0.5% kept) but apply them to scores aggregated per group:

    blocks (bh, bw)  the weight viewed as (out, in * kernel) cut into bh x bw tiles
    rows             one group per output unit (dim 0): a whole filter / output neuron
    columns          one group per input unit (dim 1): a whole input channel / feature
    heads            the rows of q, k, v and the columns of the output projection that belong to
                     one attention head, one score shared by the four matrices (sites.py)
    neurons          one FFN neuron: its row of the first FFN Linear and its column of the second

Movement scores S have the group shape; the mask is M = expand(TopK(S, v)) and the straight-through
estimator makes dL/dS_g = sum over the group's entries of dL/dW' * W (the movement aggregated per
group; for heads and neurons summed over every tied matrix). Magnitude uses the mean |W| of the
group (over every tied matrix)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError

STRUCTURES = ("unstructured", "blocks", "rows", "columns", "heads", "neurons")
TIED = ("heads", "neurons")       # groups shared by several layers (sites.py)


@dataclass(frozen=True)
class Grouping:
    """How a weight maps to groups. ``kind`` "axis": ``shape[axis]`` cut into groups of ``size``
    consecutive units (rows: axis 0, columns / FFN inputs: axis 1, heads: size head_dim);
    ``kind`` "blocks": the 2-D view (out, rest) cut into ``block`` tiles."""
    kind: str
    axis: int = 0
    size: int = 1
    block: tuple = (1, 1)

    def groups_shape(self, shape) -> tuple:
        shape = tuple(shape)
        if self.kind == "axis":
            return (shape[self.axis] // self.size,)
        rest = math.prod(shape[1:])
        return (shape[0] // self.block[0], rest // self.block[1])

    def group_numel(self, shape) -> int:
        return math.prod(shape) // math.prod(self.groups_shape(shape))

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over each group's entries (group shape)."""
        if self.kind == "axis":
            n = t.shape[self.axis] // self.size
            return t.movedim(self.axis, 0).reshape(n, self.size, -1).sum(dim=(1, 2))
        bh, bw = self.block
        g0, g1 = self.groups_shape(t.shape)
        return t.reshape(g0, bh, g1, bw).sum(dim=(1, 3))

    def expand(self, g: torch.Tensor, shape) -> torch.Tensor:
        """The per-weight tensor of ``shape`` whose entries take their group's value of ``g``."""
        shape = tuple(shape)
        if self.kind == "axis":
            v = g.repeat_interleave(self.size)
            view = [1] * len(shape)
            view[self.axis] = shape[self.axis]
            return v.reshape(view).expand(shape)
        bh, bw = self.block
        return g.repeat_interleave(bh, 0).repeat_interleave(bw, 1).reshape(shape)

    def check(self, shape, what: str) -> None:
        shape = tuple(shape)
        if self.kind == "axis":
            if len(shape) <= self.axis or shape[self.axis] % self.size:
                raise ConfigError(f"{what}: weight shape {list(shape)} cannot be cut into groups of "
                                  f"{self.size} along dim {self.axis}")
            return
        rest = math.prod(shape[1:])
        if shape[0] % self.block[0] or rest % self.block[1]:
            raise ConfigError(f"{what}: weight {list(shape)} (viewed as [{shape[0]}, {rest}]) is not a "
                              f"whole number of blocks {list(self.block)}: choose a block that divides it")


ROWS, COLUMNS = Grouping("axis", 0, 1), Grouping("axis", 1, 1)


def grouping_for(config, name: str, weight: torch.Tensor) -> Grouping | None:
    """The per-layer grouping of ``config.structure`` (None: unstructured), checked on ``weight``."""
    s = getattr(config, "structure", "unstructured")
    if s == "unstructured":
        return None
    if s in TIED:
        raise ConfigError(f"structure {s!r} groups several layers; prune_ finds them (sites.py)")
    g = {"rows": ROWS, "columns": COLUMNS}.get(s) or Grouping("blocks", block=tuple(config.block))
    g.check(weight.shape, f"layer {name!r} ({s})")
    return g


__all__ = ["STRUCTURES", "TIED", "Grouping", "ROWS", "COLUMNS", "grouping_for"]
