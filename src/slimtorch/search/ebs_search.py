"""``ebs_search``: EBS's search stage as one call (the recipe step ``search: {method: ebs}`` runs it).

On a copy of the float model: attach the mixers (search/ebs.py), initialise every candidate's range on
``calib_batches`` batches, then ``steps`` Adam steps on task loss + complexity loss (strengths frozen for
the first ``warmup``), and select the plan (search/ebs_select.py). The model passed in is not modified;
retraining at the chosen bits is the caller's (``quantize_(model, quant, plan=result.plan)``), so all
plan makers (HAWQ-V2, EBS, Uhlich) can be retrained on one schedule.
"""
from __future__ import annotations

import copy
import itertools
import time

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..quant.api import calibrate
from ..quant.configs import LSQPlus
from .ebs import EBSConfig, ebs_, ebs_param_groups, remove_ebs_, searched_layers, set_temperature, temperature_at
from .ebs_select import EBSResult, ebs_select
from .hessian import default_loss


def _batches(data):
    """An endless stream of batches: a callable ``epoch -> iterable`` or a re-iterable loader/list."""
    for epoch in itertools.count():
        it = data(epoch) if callable(data) and not hasattr(data, "__iter__") else data
        n = 0
        for b in it:
            n += 1
            yield b
        if n == 0:
            raise DataError("the data yielded no batch: the EBS search needs training batches")
        if iter(it) is it:       # a one-shot iterator: it cannot be read twice
            return


def _probs(state) -> dict:
    with torch.no_grad():
        return {n: {"w": [round(v, 5) for v in wm.probs().tolist()]}
                | ({"a": [round(v, 5) for v in am.probs().tolist()]} if am is not None else {})
                for n, (wm, am) in state.mixers.items()}


def ebs_search(model, data, config: EBSConfig | None = None, *, quant=None, loss_fn=None,
               example_input=None, progress: bool = True, keep_model: bool = False) -> EBSResult:
    """Search per-layer bits with EBS on a copy of ``model`` and return the plan (EBSResult).
    ``data``: (x, y) batches (a loader, a list, or ``epoch -> iterable``); ``loss_fn(model, batch)``
    (default cross-entropy); ``quant``: the LSQ/LSQ+ config the plan is for (default LSQPlus()).
    ``keep_model``: also return the searched copy (mixers removed) as ``result.model``.
    Under torch.distributed the search runs on rank 0 alone and the result is broadcast."""
    from ..distributed import once_and_broadcast
    # under torch.distributed the search runs once, on rank 0, and every rank gets its plan
    return once_and_broadcast(lambda: _search(model, data, config, quant, loss_fn, example_input, progress,
                                              keep_model))


def _search(model, data, config, quant, loss_fn, example_input, progress, keep_model) -> EBSResult:
    cfg = config or EBSConfig()
    quant = quant if quant is not None else LSQPlus()
    loss_fn = loss_fn or default_loss
    stream = _batches(data)
    first = next(stream, None)
    if first is None:
        raise DataError("the data yielded no batch: the EBS search needs training batches")
    stream = itertools.chain([first], stream)
    if example_input is None and cfg.budget == "bitops":
        if not isinstance(first, (list, tuple)):
            raise ConfigError("budget='bitops' needs example_input= for dict batches")
        example_input = first[0]
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    m = copy.deepcopy(model)
    _, float_layers = searched_layers(m, cfg, example_input)
    state = ebs_(m, cfg, quant, example_input)
    m.train()
    if cfg.calib_batches:
        calib = list(itertools.islice(stream, cfg.calib_batches))
        calibrate(m, calib, bias_correction=False, rounding="nearest")
        stream = itertools.chain(calib, stream)
    groups = ebs_param_groups(m, cfg.lr, cfg.strength_lr)
    opt = torch.optim.Adam(groups)
    strengths = groups[1]["params"]
    history = []
    bar = tqdm(range(cfg.steps), desc="EBS search", disable=not progress, leave=False)
    for step in bar:
        try:
            batch = next(stream)
        except StopIteration:
            raise DataError(f"the data ran out after {step} of {cfg.steps} EBS steps (a one-shot "
                            "iterator? pass a loader or a list)") from None
        frozen = step < cfg.warmup
        if cfg.temperature_final is not None:
            set_temperature(m, temperature_at(cfg, step))
        for p in strengths:
            p.requires_grad_(not frozen)
        task = loss_fn(m, batch)
        comp = state.complexity_loss()
        loss = task + (0.0 if frozen else comp.to(task.dtype))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, cfg.steps // 50) == 0 or step == cfg.steps - 1:
            e = float(state.expected_cost().detach())
            history.append({"step": step, "expected": e, "loss": float(task.detach()), "probs": _probs(state)})
            bar.set_postfix(loss=f"{float(task.detach()):.3f}", cost=f"{e / state.target_value:.3f}x")
    for p in strengths:
        p.requires_grad_(True)
    result = ebs_select(m)
    result.float_layers, result.history, result.seconds = float_layers, history, round(time.time() - t0, 2)
    if keep_model:
        result.model = remove_ebs_(m)
    return result


def ebs_plan(model, data, config: EBSConfig | None = None, **kwargs) -> dict:
    """The EBS plan {layer: {"w_bits": b, "a_bits": a}} (see :func:`ebs_search`)."""
    return ebs_search(model, data, config, **kwargs).plan
