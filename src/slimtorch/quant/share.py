"""Unified input quantizers: layers that read the very same tensor (a transformer's Q/K/V
projections, the branches of an Inception block) get one input quantizer, so the deployed graph
quantizes that tensor once and integer kernels can share (or concatenate) the codes."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..attach import input_quantizer, set_input_quantizer
from ..errors import ConfigError
from .api import quantized_layers


def _spec(q):
    try:
        return q.spec()
    except NotImplementedError:
        return None


@torch.no_grad()
def share_input_quantizers(model: nn.Module, forward_fn: Callable[[nn.Module], object]) -> list[list[str]]:
    """Run ``forward_fn(model)`` once, find quantized layers whose inputs are the same tensor, and
    give each such group the input quantizer of its first layer (same spec required; a group whose
    quantizers differ, e.g. different bits, is left alone). Call it after ``quantize_`` and before
    ``calibrate``, so the shared quantizer is calibrated on what all its layers see. The forward
    pass only observes (quantizers pass data through). Returns the groups, as layer names."""
    layers = {n: m for n, m, _, aq in quantized_layers(model) if aq is not None}
    if not layers:
        raise ConfigError("share_input_quantizers: no layer has an input quantizer (quantize_ first)")
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(mod, args):
            if args:
                seen.setdefault(name, args[0])
        return hook
    hooks = [m.register_forward_pre_hook(record(n), prepend=True) for n, m in layers.items()]
    quantizers = {id(input_quantizer(m)): input_quantizer(m) for m in layers.values()}
    for q in quantizers.values():
        q.start_observing()
    was_training = model.training
    model.eval()
    try:
        forward_fn(model)
    finally:
        for h in hooks:
            h.remove()
        for q in quantizers.values():
            q.discard_observations()
        model.train(was_training)
    groups: list[list[str]] = []
    for name, x in seen.items():
        group = next((g for g in groups if seen[g[0]] is x), None)
        if group is None:
            groups.append([name])
        else:
            group.append(name)
    shared = []
    for group in (g for g in groups if len(g) > 1):
        first = input_quantizer(layers[group[0]])
        if any(_spec(input_quantizer(layers[n])) != _spec(first) for n in group[1:]):
            continue
        for n in group[1:]:
            set_input_quantizer(layers[n], first)
        shared.append(group)
    return shared
