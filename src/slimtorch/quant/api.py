"""The quantization verbs: ``quantize_`` attaches quantizers in place, ``calibrate`` runs the range
initialisers on a few batches, ``quantized_layers`` lists what is attached."""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Callable, Iterable

import torch
from torch import nn

from ..attach import (add_weight_transform, transform_input, find_layers, find_transform, input_quantizer, raw_weight,
                      set_input_quantizer)
from ..config import handler_for, register_handler
from ..errors import ConfigError, PatternError
from .batches import run_batch
from .configs import LSQ
from .quantizer import LSQQuantizer, Quantizer, check_bits


def weight_quantizer(module: nn.Module) -> Quantizer | None:
    return find_transform(module, Quantizer)


def quantized_layers(model: nn.Module):
    """Yield (name, module, weight_quantizer, input_quantizer) for every layer with a quantizer."""
    for name, m in model.named_modules():
        wq, aq = weight_quantizer(m), input_quantizer(m)
        if wq is not None or aq is not None:
            yield name, m, wq, aq


def _normalise_plan(plan, layers, cfg) -> dict[str, tuple[int, int | None]]:
    """plan: {layer: bits} or {layer: {"w_bits": .., "a_bits": ..}} -> {layer: (w, a)} for all layers."""
    plan = dict(plan or {})
    unknown = sorted(set(plan) - set(layers))
    if unknown:
        raise PatternError(f"plan names layers that are not being quantized: {unknown}")
    out = {}
    for name in layers:
        w, a = cfg.w_bits, cfg.a_bits
        entry = plan.get(name)
        if isinstance(entry, int):
            w, a = entry, (entry if a is not None else None)
        elif isinstance(entry, dict):
            bad = set(entry) - {"w_bits", "a_bits"}
            if bad:
                raise ConfigError(f"plan[{name!r}]: unknown key(s) {sorted(bad)}; use w_bits, a_bits")
            w, a = entry.get("w_bits", w), entry.get("a_bits", a)
        elif entry is not None:
            raise ConfigError(f"plan[{name!r}] must be an int or a dict, got {entry!r}")
        check_bits(w, f"plan[{name!r}].w_bits")
        if a is not None:
            check_bits(a, f"plan[{name!r}].a_bits")
        if cfg.tie_bits and a is not None:
            w = a = max(w, a)
        out[name] = (w, a)
    return out


def quantize_(model: nn.Module, config, include=None, exclude=None, plan=None) -> nn.Module:
    """Attach quantizers in place to every Conv1d/Conv2d/Linear (weight + input activation) and
    Embedding (weight) matched by the include/exclude globs; all layers by default, first and last
    included. ``plan`` overrides bits per layer (e.g. a HAWQ-V2 result). Returns ``model``.

    An ``nn.MultiheadAttention`` with a selected projection (``<mha>.q_proj``, ``k_proj``,
    ``v_proj``, ``out_proj``) is first split into projection Linears (quant/mha.py) so that all its
    weights and inputs are quantized. Modules holding parameters slimtorch cannot quantize (GRU,
    custom layers) are named in a warning and in ``report``."""
    layers = find_layers(model, include, exclude)
    for name, m in layers.items():
        if weight_quantizer(m) is not None or input_quantizer(m) is not None:
            raise ConfigError(f"layer {name!r} is already quantized")
    bits = _normalise_plan(plan, layers, config)
    from ..distributed import check_same
    check_same({"config": repr(config), "plan": bits}, "quantize_'s config and bit plan")
    handler_for(config)(model, config, layers, bits)
    if getattr(config, "bias", "float") == "int32":
        from .bias import attach_int32_bias
        for m in layers.values():
            if weight_quantizer(m) is not None and input_quantizer(m) is not None:
                attach_int32_bias(m)
    from .coverage import warn_float_modules
    from .mha import share_attention_inputs_
    share_attention_inputs_(model)
    warn_float_modules(model)
    return model


def per_channel_shape(weight: torch.Tensor) -> tuple[int, ...]:
    return (weight.shape[0],) + (1,) * (weight.dim() - 1)


def lsq_weight_quantizer(cfg: LSQ, m: nn.Module, bits: int) -> LSQQuantizer:
    """The weight quantizer ``cfg`` gives layer ``m`` at ``bits`` (also EBS's per-bit candidates)."""
    shape = per_channel_shape(m.weight) if cfg.weights == "per_channel" else (1,)
    return LSQQuantizer(bits, "weight", signed=True, scale_shape=shape, init=cfg.w_init,
                        use_grad_scale=cfg.grad_scale).to(m.weight.device)


def lsq_input_quantizer(cfg: LSQ, m: nn.Module, bits: int) -> LSQQuantizer:
    """The input-activation quantizer ``cfg`` gives layer ``m`` at ``bits``."""
    signed = {"auto": None, "signed": True, "unsigned": False, "offset": False}[cfg.activations]
    integer_kernels = cfg.bias == "int32" or cfg.integer_offset      # they take one input scale
    return LSQQuantizer(bits, "activation", signed=signed, learn_offset=cfg.activations == "offset",
                        init=cfg.a_init, use_grad_scale=cfg.grad_scale, integer_offset=cfg.integer_offset,
                        percentile=cfg.percentile,
                        per_channel_input=cfg.model_input == "per_channel" and not integer_kernels,
                        ).to(m.weight.device)


@register_handler(LSQ)
def _apply_lsq(model, cfg: LSQ, layers, bits):
    for name, m in layers.items():
        w_bits, a_bits = bits[name]
        add_weight_transform(m, lsq_weight_quantizer(cfg, m, w_bits))
        if a_bits is not None and not isinstance(m, nn.Embedding):
            set_input_quantizer(m, lsq_input_quantizer(cfg, m, a_bits))


def _iterate(forward_loop, model, num_batches):
    if callable(forward_loop):
        forward_loop(model)
        return
    device = next(model.parameters()).device
    for i, batch in enumerate(forward_loop):
        if num_batches is not None and i >= num_batches:
            break
        run_batch(model, batch[0] if isinstance(batch, (list, tuple)) else batch, device)


@torch.no_grad()
def calibrate(model: nn.Module, forward_loop: Callable | Iterable, num_batches: int | None = None,
              reinit_weights: bool = False, bias_correction: bool = True, rounding: str = "auto") -> int:
    """Post-training range setting in one pass. Weight quantizers not yet initialised (all of them
    with ``reinit_weights``) are fitted to their weights first (``w_init``: e.g. MSE per output
    channel). Then ``forward_loop(model)`` runs (or the first ``num_batches`` of a loader) with every
    activation quantizer observing (float pass-through): observer inits (``a_init`` minmax /
    percentile / mse_hist / entropy, quant/observers.py) accumulate over ALL batches, sample inits
    (lsq / 3sigma / mse) keep a subsample of every batch; each quantizer's s (and beta) is set once at
    the end; a layer reading the model's own input gets per-channel ranges there (LSQ ``model_input``,
    quant/model_input.py). Then, with ``bias_correction`` (default), the expected output shift that weight rounding
    causes is measured on the same batches and moved into each layer's bias (quant/bias_correction.py;
    on pretrained EfficientNet-Lite1 at W8A8 it lifts logit cosine and agreement: benchmarks/RESULTS.md,
    row bias_correction=False).
    ``rounding``: "auto" (default) rounds the weights of every layer with at most 4 weight bits by
    GPTQ (quant/gptq.py: error-compensating, cross-validated on the batches; the rounded layers'
    output shift goes into their bias), the rest to nearest; "gptq" does so at any bit width;
    "nearest" leaves every weight to its quantizer's rounding (QAT, which learns from the float
    weights, uses this). GPTQ replays the batches: with a forward_loop callable "auto" rounds to
    nearest and "gptq" is an error.
    A one-shot iterator (generator) is read once into a list (its first ``num_batches``) so all
    passes see the same batches.
    Returns the number of activation quantizers initialised; train/eval mode is restored."""
    if isinstance(forward_loop, Iterator):        # one-shot (maybe endless); a loader is left alone
        forward_loop = list(itertools.islice(forward_loop, num_batches))
    if rounding not in ROUNDINGS:
        raise ConfigError(f"calibrate: rounding={rounding!r}; expected one of {ROUNDINGS}")
    n = _observe_activations(model, forward_loop, num_batches, reinit_weights)
    max_bits = {"auto": 4, "gptq": 8}.get(rounding)
    if max_bits is not None and _any_weight_bits(model, max_bits):
        if callable(forward_loop):
            if rounding == "gptq":
                raise ConfigError("calibrate: rounding='gptq' replays the calibration batches layer by layer: "
                                  "pass them as a list or loader, not a forward_loop callable")
        else:
            from .gptq import gptq_
            batches = forward_loop if num_batches is None else list(itertools.islice(forward_loop, num_batches))
            gptq_(model, batches, max_bits=max_bits, bias_correction=bias_correction)
            return n
    if bias_correction:
        from .bias_correction import bias_correct_
        bias_correct_(model, forward_loop, num_batches)
    return n


ROUNDINGS = ("auto", "gptq", "nearest")


def _any_weight_bits(model: nn.Module, max_bits: int) -> bool:
    return any(isinstance(wq, LSQQuantizer) and not isinstance(m, nn.Embedding) and wq.bits <= max_bits
               for _, m, wq, _ in quantized_layers(model))


def _observe_activations(model, forward_loop, num_batches, reinit_weights) -> int:
    """Fit the weight ranges, then one observed pass for every activation quantizer."""
    for _, m, wq, _ in quantized_layers(model):
        if wq is not None and (reinit_weights or not wq.initialized):
            wq.initialize(transform_input(m, wq).detach())
    acts = list({id(aq): aq for *_, aq in quantized_layers(model) if aq is not None}.values())
    owners: dict[int, list[str]] = {}
    for name, _, _, aq in quantized_layers(model):
        if aq is not None:
            owners.setdefault(id(aq), []).append(name)
    if not acts:
        return 0
    was_training = model.training
    model.eval()
    for q in acts:
        q.start_observing()
    from .coverage import explain_unseen, record_calls
    from .model_input import candidate_layers, model_input_ranges
    try:
        with record_calls() as ran, model_input_ranges(model, candidate_layers(model)) as inputs:
            _iterate(forward_loop, model, num_batches)
        from .observer_sync import sync_observations_
        sync_observations_(acts)          # under torch.distributed: every rank's data, merged
    finally:
        seen = [q.has_observed() for q in acts]
        for q in acts:
            q.finish_observing()
        model.train(was_training)
    inputs.apply()                        # layers reading the model's input: per-channel ranges
    if not all(seen):
        if not any(id(m) in ran for m in model.modules()):
            raise ConfigError(f"calibration saw no data for {seen.count(False)} activation quantizer(s): "
                              "the forward_loop did not run the model (empty loader?)")
        names = [n for q, ok in zip(acts, seen) if not ok for n in owners[id(q)]]
        raise ConfigError(f"calibration saw no data for {seen.count(False)} activation quantizer(s), the "
                          "input quantizers of: " + "; ".join(explain_unseen(model, names, ran)))
    return len(acts)
