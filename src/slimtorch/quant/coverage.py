"""What stays float and why: modules holding parameters slimtorch has no quantizer for, and layers
whose forward a parent bypasses (it uses their weight functionally), so that no float layer is
silent (``report`` lists the first, ``quantize_`` warns about them, ``calibrate`` names the second)."""
from __future__ import annotations

import contextlib
import warnings

from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from ..attach import QUANTIZABLE
from .quantizer import Quantizer

#: float by design: normalisation parameters are counted as "other float params" by the report
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase,
         *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def _reason(module: nn.Module) -> str:
    from .mha import is_split
    if isinstance(module, nn.RNNBase):
        return (f"{type(module).__name__} runs its weights inside the fused recurrent kernel "
                "(used functionally); slimtorch has no quantizer for them")
    if isinstance(module, nn.MultiheadAttention):
        if is_split(module):
            return "added to the projected keys/values in float (no weight to quantize)"
        return ("in_proj weights are used functionally by F.multi_head_attention_forward; quantize_ "
                "splits them into q/k/v_proj Linears only when a projection is selected")
    return f"slimtorch has no quantizer for parameters of {type(module).__name__}"


def float_modules(model: nn.Module) -> list[dict]:
    """[{name, kind, params (names), numel, reason}] for every module that holds parameters of its
    own (not in children) and is neither a quantizable layer, a quantizer, a norm nor a
    parametrization container: what ``quantize_`` leaves float without being asked to."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, QUANTIZABLE + NORMS + (Quantizer,)) or type(m).__name__ == "ParametrizationList" \
                or getattr(m, "cost_role", None):        # compression state (masks, folds): slimtorch.cost
            continue
        own = {k: p for k, p in m._parameters.items() if p is not None}
        if not own:
            continue
        out.append({"name": name or "(model)", "kind": type(m).__name__, "params": sorted(own),
                    "numel": sum(p.numel() for p in own.values()), "reason": _reason(m)})
    return out


def float_lines(entries: list[dict]) -> list[str]:
    return [f"stays float: {e['name']} ({e['kind']}): {', '.join(e['params'])} ({e['numel']:,} values): "
            f"{e['reason']}" for e in entries]


def warn_float_modules(model: nn.Module) -> list[dict]:
    entries = float_modules(model)
    if entries:
        warnings.warn("slimtorch.quantize_: these modules stay float:\n  " + "\n  ".join(float_lines(entries)),
                      stacklevel=3)
    return entries


@contextlib.contextmanager
def record_calls():
    """Yield a set that collects id() of every module whose forward runs (a global pre-hook: it
    does not count as a hook on any module, so torch's fast-path decisions are unchanged)."""
    from torch.nn.modules.module import register_module_forward_pre_hook
    ran: set[int] = set()
    handle = register_module_forward_pre_hook(lambda mod, args: ran.add(id(mod)))
    try:
        yield ran
    finally:
        handle.remove()


def explain_unseen(model: nn.Module, layer_names: list[str], ran: set[int]) -> list[str]:
    """Per layer whose quantizer saw no data: which running ancestor bypasses its forward."""
    mods = dict(model.named_modules())
    out = []
    for name in layer_names:
        m, parts = mods[name], name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            anc = ".".join(parts[:i])
            if id(mods[anc]) in ran:
                rel = ".".join(parts[i:])
                where = f"{type(mods[anc]).__name__} {anc!r}" if anc else f"the model ({type(model).__name__})"
                out.append(f"{rel} ({type_before_parametrizations(m).__name__} inside {where} uses its weight functionally "
                           "or never calls it)")
                break
        else:
            out.append(f"{name} ({type_before_parametrizations(m).__name__}): the model did not run")
    return out
