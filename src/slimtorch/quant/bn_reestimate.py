"""BatchNorm re-estimation after quantization (Nagel et al. 2022, "Overcoming oscillations in
quantization-aware training", Sec. 4.1; also Krishnamoorthi 2018). After QAT the running
statistics were averaged over weights that kept changing (and oscillating between levels); they are
reset and accumulated again over ``num_batches`` with the quantized model fixed, as a cumulative
average (BatchNorm ``momentum=None``):

    running_mean = (1/K) sum_k mean_k(x),   running_var = (1/K) sum_k var_k(x)   (unbiased per batch)

over the K batches, x the BN's input with every quantizer active. Only the BNs run in train mode;
quantizers neither observe nor (re-)initialise, nothing is trained."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ConfigError
from .api import _iterate, quantized_layers
from .bn_qat import BatchNormFold


def _average_over_ranks(bns: dict) -> None:
    """Under torch.distributed: the cumulative averages of every rank averaged (each rank ran the same
    number of batches), the batch counts summed, so every rank holds the statistics of all batches."""
    from .. import distributed as D
    if not D.active():
        return
    names = sorted(bns)
    D.check_same(names, "the BatchNorms reestimate_bn_ re-estimates")
    for n in names:
        m = bns[n]
        D.all_reduce_(m.running_mean, "mean")
        D.all_reduce_(m.running_var, "mean")
        D.all_reduce_(m.num_batches_tracked, "sum")


@torch.no_grad()
def reestimate_bn_(model: nn.Module, forward_loop: Callable | Iterable, num_batches: int | None = None) -> dict:
    """Reset and re-accumulate the running statistics of every BatchNorm with running statistics,
    running ``forward_loop(model)`` (or the first ``num_batches`` of a loader of batches). Returns
    {bn name: batches seen}. BNs folded for QAT (``fold_batchnorm_(train=True)``) are left as they
    are: their statistics are part of the quantized weight. A BN the loop never reaches keeps its
    old statistics (and is not in the result). Modes and momenta are restored afterwards."""
    for name, _, wq, aq in quantized_layers(model):
        for q in (wq, aq):
            if q is not None and (getattr(q, "initialized", True) is False or getattr(q, "observing", False)):
                raise ConfigError(f"reestimate_bn_: the quantizers of {name!r} are not initialised "
                                  "(run slimtorch.calibrate first)")
    in_fold = {id(m.bn) for m in model.modules() if isinstance(m, BatchNormFold)}
    bns = {n: m for n, m in model.named_modules()
           if isinstance(m, _BatchNorm) and m.track_running_stats and id(m) not in in_fold}
    if not bns:
        return {}
    old = {n: (m.momentum, {k: v.clone() for k, v in m._buffers.items() if v is not None}) for n, m in bns.items()}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for m in bns.values():
            m.reset_running_stats()
            m.momentum = None            # cumulative moving average
            m.train()
        _iterate(forward_loop, model, num_batches)
        _average_over_ranks(bns)
    except BaseException:
        for n, m in bns.items():         # restore the old statistics on any failure
            for k, v in old[n][1].items():
                m._buffers[k].copy_(v)
        raise
    finally:
        for n, m in bns.items():
            m.momentum = old[n][0]
        for m, mode in modes.items():
            m.training = mode
    seen = {}
    for n, m in bns.items():
        k = int(m.num_batches_tracked)
        if k == 0:
            for key, v in old[n][1].items():
                m._buffers[key].copy_(v)
        else:
            seen[n] = k
    if not seen:
        raise ConfigError("reestimate_bn_: the forward loop ran no batch through a BatchNorm "
                          "(empty loader?); statistics left as they were")
    return seen
