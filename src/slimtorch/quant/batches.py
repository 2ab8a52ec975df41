"""How the calibration verbs (calibrate, bias_correct_, reestimate_bn_, gptq_, adaround_) call a model
on one batch of a list or loader."""
from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn


def run_batch(model: nn.Module, x, device):
    """``model`` on one calibration input ``x``, as every calibration verb calls it: a tensor moved to
    ``device``; a mapping whose keys are all named parameters of ``model.forward`` (a tokenizer's
    output for a Hugging Face model: input_ids, attention_mask, ...) as keyword arguments, its tensors
    moved; anything else (a dict a model takes whole) as one argument, as it is."""
    if isinstance(x, torch.Tensor):
        return model(x.to(device))
    if isinstance(x, Mapping) and x and set(x) <= _named_parameters(model):
        return model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in x.items()})
    return model(x)


def _named_parameters(model: nn.Module) -> set:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
