"""Batch iteration whose order is a pure function of (seed, epoch), so training can resume mid-epoch.

``loader.batches(epoch, start=k)`` regenerates epoch ``epoch``'s order and skips its first ``k``
batches; iterating the loader directly walks epochs 0, 1, 2, ... (or from ``set_epoch``).
"""

from __future__ import annotations

import math
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from slimtorch.errors import ConfigError

__all__ = ["epoch_seed", "epoch_generator", "EpochBatches", "EpochLoader", "make_loader", "make_loaders"]


def _nonneg_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed derived from (seed, epoch), identical on every platform and process."""
    state = np.random.SeedSequence([_nonneg_int(seed, "seed"), _nonneg_int(epoch, "epoch")]).generate_state(
        2, dtype=np.uint32)
    return (int(state[0]) | (int(state[1]) << 32)) & ((1 << 63) - 1)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from (seed, epoch), e.g. for a plain DataLoader's ``generator``."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch))


class EpochBatches:
    """One epoch's batches (fixed index chunks); iterable, possibly more than once, with a length."""

    def __init__(self, dataset: Dataset, chunks: List[torch.Tensor]):
        self.dataset, self.chunks = dataset, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, ...]]:
        if isinstance(self.dataset, TensorDataset):
            tensors = self.dataset.tensors
            return (tuple(t[c] for t in tensors) for c in self.chunks)
        loader = DataLoader(self.dataset, batch_sampler=[c.tolist() for c in self.chunks], num_workers=0)
        return (tuple(b) if isinstance(b, (list, tuple)) else b for b in loader)


class EpochLoader:
    """Iterable of batches; epoch ``e``'s order depends only on (seed, e) (and rank/num_replicas).

    With ``num_replicas > 1`` every rank draws the same global permutation, pads it to a multiple of
    ``num_replicas`` and takes every ``num_replicas``-th index from ``rank`` (like DistributedSampler).
    A TensorDataset is batched by direct tensor indexing; other datasets go through a DataLoader with
    ``num_workers=0``. Batches are tuples ``(x, y, ...)``.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, num_replicas: int = 1, rank: int = 0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, (int, np.integer)) or num_replicas < 1:
            raise ConfigError(f"num_replicas must be a positive integer, got {num_replicas!r}")
        rank = _nonneg_int(rank, "rank")
        if rank >= num_replicas:
            raise ConfigError(f"rank must be in [0, {num_replicas - 1}], got {rank}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = _nonneg_int(seed, "seed")
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.num_replicas = int(num_replicas)
        self.rank = rank
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return math.ceil(len(self.dataset) / self.num_replicas)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next plain iteration use ``epoch``'s order."""
        self.epoch = _nonneg_int(epoch, "epoch")

    def order(self, epoch: int) -> torch.Tensor:
        """Indices (int64) this rank visits in ``epoch``, in order."""
        n = len(self.dataset)
        if self.shuffle:
            idx = torch.randperm(n, generator=epoch_generator(self.seed, epoch))
        else:
            _nonneg_int(epoch, "epoch")
            idx = torch.arange(n)
        if self.num_replicas > 1:
            total = self.num_samples * self.num_replicas
            if total > n and n > 0:
                idx = torch.cat([idx, idx.repeat(math.ceil((total - n) / n))[: total - n]])
            idx = idx[self.rank:total:self.num_replicas]
        return idx

    def batches(self, epoch: int, start: int = 0) -> "EpochBatches":
        """Batches of ``epoch`` beginning at batch number ``start`` (to resume a checkpoint mid-epoch).

        The result has a ``len`` (batches left), so ``loader.batches`` can be handed to a trainer as
        its ``train_batches(epoch)`` function.
        """
        start = _nonneg_int(start, "start")
        idx = self.order(epoch)
        bounds = [(b * self.batch_size, min((b + 1) * self.batch_size, len(idx))) for b in range(len(self))]
        return EpochBatches(self.dataset, [idx[lo:hi] for lo, hi in bounds[start:]])

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, ...]]:
        epoch = self.epoch
        self.epoch += 1
        return iter(self.batches(epoch))

    def __repr__(self) -> str:
        return (f"EpochLoader(n={len(self.dataset)}, batch_size={self.batch_size}, seed={self.seed}, "
                f"shuffle={self.shuffle}, epoch={self.epoch}, batches={len(self)})")


def make_loader(dataset: Dataset, batch_size: int = 64, seed: int = 0, *, shuffle: bool = True,
                drop_last: bool = False, num_replicas: int = 1, rank: int = 0) -> EpochLoader:
    """An :class:`EpochLoader` over one dataset."""
    return EpochLoader(dataset, batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
                       num_replicas=num_replicas, rank=rank)


def make_loaders(bundle, batch_size: int = 64, seed: int = 0, *, test_batch_size: Optional[int] = None,
                 shuffle: bool = True, drop_last: bool = False, num_replicas: int = 1,
                 rank: int = 0) -> Tuple[EpochLoader, EpochLoader]:
    """(train, test) loaders for a DataBundle: train shuffled per (seed, epoch), test in fixed order.

    The test loader is not sharded across replicas (every rank sees the whole test split); build a
    validation loader with ``make_loader(bundle.val, ..., shuffle=False)``.
    """
    train = make_loader(bundle.train, batch_size, seed, shuffle=shuffle, drop_last=drop_last,
                        num_replicas=num_replicas, rank=rank)
    test = make_loader(bundle.test, test_batch_size or batch_size, seed, shuffle=False)
    return train, test
