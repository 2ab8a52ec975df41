"""Shared benchmark plumbing: cached float models, QAT from a float checkpoint, step timing."""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch

import slimtorch as st
from slimtorch.checkpoint import load_checkpoint, save_checkpoint
from slimtorch.data import load_dataset, make_loaders
from slimtorch.models import build_model
from slimtorch.train import TrainConfig, evaluate, train

CACHE = Path("runs/bench-cache")


def float_model(model: str, dataset: str, cfg: TrainConfig, data_options=None, tag=""):
    """(model, bundle, train_loader, test_loader) with a float model trained by ``cfg`` (cached)."""
    bundle = load_dataset(dataset, **(data_options or {}))
    m = build_model(model, num_classes=bundle.num_classes)
    tr, te = make_loaders(bundle, batch_size=cfg.batch_size, seed=cfg.seed, test_batch_size=1000)
    path = CACHE / f"{model}-{dataset}-e{cfg.epochs}-s{cfg.seed}{tag}.ckpt"
    if path.exists():
        load_checkpoint(path, model=m, restore_rng=False)
    else:
        train(m, tr.batches, cfg)
        CACHE.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, model=m)
    return m, bundle, tr, te


def accuracy(model, test) -> float:
    return 100.0 * evaluate(model, test.batches(0))["accuracy"]


def qat(float_net, method, tr, te, cfg: TrainConfig, calib_batches=8):
    """Copy the float net, attach ``method`` (a config, or None for the float control), calibrate,
    fine-tune with ``cfg``; returns (model, accuracy after calibration, accuracy after fine-tuning)."""
    m = copy.deepcopy(float_net)
    if method is not None:
        st.quantize_(m, method)
        st.calibrate(m, tr.batches(0), num_batches=calib_batches, rounding="nearest")
    before = accuracy(m, te)
    train(m, tr.batches, cfg)
    return m, before, accuracy(m, te)


def step_times(models: dict, x, y, steps=30, warmup=5, rounds=3) -> dict:
    """Median seconds per training step (forward+backward+Adam) for each model, interleaved in
    ``rounds`` so that load changes hit all models alike."""
    opts = {k: torch.optim.Adam(m.parameters(), 1e-4) for k, m in models.items()}
    times = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            m.train()
            for i in range(steps + warmup):
                t = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(m(x), y)
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                opts[k].step()
                if i >= warmup:
                    times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def batches(x, y, bs: int, seed: int):
    """Endless shuffled batches of (x, y) tensors, epoch after epoch, seeded."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - bs + 1, bs):
            j = perm[i:i + bs]
            yield x[j], y[j]


@torch.no_grad()
def acc(model, x, y, bs=1000) -> float:
    """Top-1 accuracy (%) of ``model`` on the tensors (x, y), in eval mode."""
    model.eval()
    hit = sum(int((model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum()) for i in range(0, len(y), bs))
    return 100.0 * hit / len(y)
