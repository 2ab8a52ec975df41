"""``slimtorch run --nproc N``: the workers are started by torch's own launcher (``torchrun``), each
running ``slimtorch run`` inside one process group (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import contextlib
import os
import sys

import torch

from ..errors import ConfigError


def _batch_sizes(recipe) -> dict:
    out = {}
    for name in ("train", "finetune"):
        section = getattr(recipe, name, None)
        if section:
            out[name] = section.get("batch_size", 64)
    return out


def launch(args, recipe, out) -> int:
    """Check the request, then hand over to torch.distributed.run (the code behind ``torchrun``)."""
    from .. import distributed as D

    backend = args.backend or "gloo"
    D.check_launch(args.nproc, backend)
    world = args.nproc * args.nnodes
    for name, bs in _batch_sizes(recipe).items():
        if bs % world:
            raise ConfigError(f"{name}.batch_size={bs} does not divide by the world size {world} "
                              f"(--nproc {args.nproc} x --nnodes {args.nnodes}): each step splits one global batch")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise ConfigError("--nnodes > 1 needs --rdzv-endpoint host:port (the same on every machine)")
    from torch.distributed.run import main as torchrun
    cmd = ["--nproc_per_node", str(args.nproc), "--nnodes", str(args.nnodes)]
    cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint] if args.nnodes > 1 else ["--standalone"]
    cmd += ["-m", "slimtorch.cli", "run", str(args.recipe), "--out", str(out), "--backend", backend]
    cmd += ["--resume"] if args.resume else []
    cmd += ["--no-progress"] if args.no_progress else []
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    try:
        torchrun(cmd)                     # rank 0 prints the report
    except ChildFailedError as e:
        print(f"slimtorch run: a worker failed ({e.get_first_failure()[1].message if e.failures else e}); "
              f"rerun with --resume to continue from {out}", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def worker(backend):
    """Inside a torchrun worker: join the process group (threads split over the local workers)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "LOCAL_RANK" not in os.environ:
        yield
        return
    import torch.distributed as dist
    backend = backend or "gloo"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // local))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()
        sys.stdout.flush()
