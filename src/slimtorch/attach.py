"""Attach compression state to layers without rewriting the graph.

Weight transforms (fake-quant, pruning masks; quant-noise and codebooks later) are registered as
``torch.nn.utils.parametrize`` parametrizations of ``weight`` (they stack, in registration order);
the input-activation quantizer is a submodule ``input_quantizer`` applied by a forward pre-hook.
Works on any nn.Module (HF transformers included) without tracing."""
from __future__ import annotations

import fnmatch

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import PatternError

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding)


def _as_list(p):
    return [] if p is None else [p] if isinstance(p, str) else list(p)


def find_layers(model: nn.Module, include=None, exclude=None, types=QUANTIZABLE,
                what: str = "quantizable") -> dict[str, nn.Module]:
    """Layers of ``types`` whose qualified name matches an ``include`` glob (all when None) and no
    ``exclude`` glob. A pattern that matches no layer raises PatternError naming it.
    An nn.MultiheadAttention one of whose projections the globs select is split first (in place,
    same outputs) into q/k/v_proj Linears, so that all its projections are layers (quant/mha.py)."""
    if types == QUANTIZABLE:
        from .quant.mha import split_selected_
        split_selected_(model, include, exclude)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, types)}
    if not layers:
        raise PatternError(f"no {what} layer ({', '.join(t.__name__ for t in types)}) in "
                           f"{type(model).__name__}")
    inc, exc = _as_list(include), _as_list(exclude)
    for pat in inc + exc:
        if not any(fnmatch.fnmatchcase(n, pat) for n in layers):
            sample = ", ".join(list(layers)[:8]) + (" ..." if len(layers) > 8 else "")
            raise PatternError(f"pattern {pat!r} matches no layer; layers are: {sample}")
    chosen = {n: m for n, m in layers.items()
              if (not inc or any(fnmatch.fnmatchcase(n, p) for p in inc))
              and not any(fnmatch.fnmatchcase(n, p) for p in exc)}
    if not chosen:
        raise PatternError(f"include={inc} exclude={exc} leave no layer to compress")
    return chosen


def weight_transforms(module: nn.Module) -> list[nn.Module]:
    if parametrize.is_parametrized(module, "weight"):
        return list(module.parametrizations.weight)
    return []


def raw_param(module: nn.Module, name: str) -> torch.Tensor | None:
    """The stored float tensor ``name`` (before any attached transform), or None."""
    if parametrize.is_parametrized(module, name):
        return getattr(module.parametrizations, name).original
    return getattr(module, name, None)


def raw_weight(module: nn.Module) -> torch.Tensor:
    """The stored float weight (before any attached transform)."""
    return raw_param(module, "weight")


def transform_input(module: nn.Module, transform: nn.Module) -> torch.Tensor:
    """The tensor ``transform`` receives: the stored weight through the transforms stacked before it
    (e.g. a BatchNorm fold before the quantizer), so range fitting and export see what it sees."""
    x = raw_weight(module)
    for t in weight_transforms(module):
        if t is transform:
            return x
        x = t(x)
    raise ValueError(f"{type(transform).__name__} is not a weight transform of this module")


def add_weight_transform(module: nn.Module, transform: nn.Module, before=None) -> None:
    """Stack ``transform`` on ``module.weight``: last by default; with ``before`` (a predicate on
    transforms), just before the first transform it accepts (e.g. a mask before the quantizer).
    torch evaluates the chain once while registering: transforms with a ``quiet`` attribute
    (training-time noise, pq/noise.py) are set quiet (identity, no random draw) meanwhile."""
    quiet = [t for t in weight_transforms(module) + [transform] if hasattr(t, "quiet")]
    for t in quiet:
        t.quiet = True
    try:
        parametrize.register_parametrization(module, "weight", transform)
    finally:
        for t in quiet:
            t.quiet = False
    if before is None:
        return
    chain = module.parametrizations.weight
    at = next((i for i, t in enumerate(chain) if t is not transform and before(t)), None)
    if at is not None:
        del chain[len(chain) - 1]
        chain.insert(at, transform)


def _private_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before torch edits class attributes. torch keeps
    a parametrized tensor as a property on the module's class, and ``copy.deepcopy`` of a parametrized
    module shares that class: removing (or adding) a parametrized tensor on the copy would delete the
    property of the original too ('ParametrizedLinear' object has no attribute 'weight')."""
    if not parametrize.is_parametrized(module):
        return
    cls = module.__class__
    attrs = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, attrs)


def remove_weight_transform(module: nn.Module, transform: nn.Module) -> None:
    """Take ``transform`` out of ``module.weight``'s chain (the stored weight is left as it is)."""
    chain = list(weight_transforms(module))
    if transform not in chain:
        raise ValueError(f"{type(transform).__name__} is not a weight transform of this module")
    if len(chain) == 1:
        _private_class(module)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    else:
        del module.parametrizations.weight[chain.index(transform)]


def add_bias_transform(module: nn.Module, transform: nn.Module) -> None:
    if not parametrize.is_parametrized(module, "bias"):
        _private_class(module)            # a new property on the class: not on a deep copy's original
    parametrize.register_parametrization(module, "bias", transform)


def bias_transforms(module: nn.Module) -> list[nn.Module]:
    if parametrize.is_parametrized(module, "bias"):
        return list(module.parametrizations.bias)
    return []


def find_transform(module: nn.Module, cls) -> nn.Module | None:
    return next((t for t in weight_transforms(module) if isinstance(t, cls)), None)


def _input_hook(module, args):
    q = module._modules.get("input_quantizer")
    if q is None or not args:
        return None
    return (q(args[0]),) + tuple(args[1:])


def set_input_quantizer(module: nn.Module, quantizer: nn.Module) -> None:
    module.add_module("input_quantizer", quantizer)
    if not getattr(module, "_slim_input_hook", False):
        module.register_forward_pre_hook(_input_hook)
        module._slim_input_hook = True


def input_quantizer(module: nn.Module):
    return module._modules.get("input_quantizer")
