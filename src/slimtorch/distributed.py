"""slimtorch under ``torch.distributed`` (DDP): the few collective helpers every verb uses.

Nothing here starts processes: ``torchrun`` (or ``slimtorch run --nproc N``, which calls torch's own
launcher) does, and the user's script calls ``torch.distributed.init_process_group`` as usual. Without
an initialised process group every helper is the single-process identity, so the verbs cost nothing
extra in one process.

Rules the verbs follow (README "Under DDP"): data-dependent statistics are REDUCED over ranks
(calibration observers, samples for sample-based inits), decisions are made ONCE on rank 0 and
BROADCAST (HAWQ-V2 / EBS plans, k-means codebooks, pruning thresholds), and what must already agree
is CHECKED (``check_same``), failing with an error that names the ranks that differ.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os

import torch
import torch.distributed as dist

from .errors import ConfigError

BACKENDS = ("gloo", "nccl")
_LOCAL = [0]


def active() -> bool:
    """True inside an initialised process group of more than one rank (and not inside ``local()``)."""
    return not _LOCAL[0] and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def local():
    """Run a block as if in one process (no collective): for work one rank does alone and then
    broadcasts, e.g. an EBS search on rank 0."""
    r = rank()
    _LOCAL[0] += 1
    try:
        yield r
    finally:
        _LOCAL[0] -= 1


def once_and_broadcast(fn):
    """``fn()`` computed on rank 0 alone (inside ``local()``) and its result broadcast to every rank."""
    if not active():
        return fn()
    result = None
    if is_main():
        with local():
            result = fn()
    return broadcast_object(result)


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (a picklable Python object made by our own code on a
    trusted peer of the same job, never read from a file)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of ``t`` (op: sum | min | max | mean)."""
    if not active():
        return t
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX,
           "mean": dist.ReduceOp.SUM}
    dist.all_reduce(t, op=ops[op])
    if op == "mean":
        t /= world_size()
    return t


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> torch.nn.Module:
    """Every parameter and buffer of ``module`` set to rank ``src``'s values (in place)."""
    if active():
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=src)
    return module


def fingerprint(obj) -> str:
    """A short stable hash of a JSON-able object (dict keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same(obj, what: str) -> None:
    """ConfigError on every rank unless ``obj`` is identical on all ranks (compared by fingerprint)."""
    if not active():
        return
    prints = all_gather_object(fingerprint(obj))
    if len(set(prints)) > 1:
        groups: dict[str, list[int]] = {}
        for r, p in enumerate(prints):
            groups.setdefault(p, []).append(r)
        raise ConfigError(f"{what} differs between ranks (ranks grouped by value: "
                          f"{sorted(groups.values())}); compute it once on rank 0 and "
                          f"broadcast it (slimtorch.distributed.broadcast_object)")


def shard(batch, r: int | None = None, w: int | None = None):
    """Rank r's contiguous slice of a global batch (x, y, ...): rows [r B / W, (r + 1) B / W).
    ConfigError unless the global batch size divides by the world size."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    if w == 1:
        return batch
    items = batch if isinstance(batch, (list, tuple)) else (batch,)
    n = items[0].shape[0]
    if n % w:
        raise ConfigError(f"a batch of {n} does not split evenly over {w} ranks: use a batch size "
                          f"divisible by the world size")
    k = n // w
    out = tuple(t[r * k:(r + 1) * k] if isinstance(t, torch.Tensor) else t for t in items)
    return out if isinstance(batch, (list, tuple)) else out[0]


def average_gradients_(params) -> None:
    """Gradients averaged over ranks (what DDP's reducer does), one flat all-reduce."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_(flat, "mean")
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def check_launch(nproc: int, backend: str) -> None:
    """Clear errors before starting workers: nproc within the cores (CPU) or GPUs (nccl)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc={nproc!r}: expected an integer >= 1")
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} does not exist here; expected one of {BACKENDS}")
    if backend == "nccl":
        n = torch.cuda.device_count()
        if nproc > n:
            raise ConfigError(f"--nproc={nproc} with nccl needs {nproc} GPUs; this machine has {n}")
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if nproc > cores:
            raise ConfigError(f"--nproc={nproc} is more than the {cores} CPU core(s) available")
