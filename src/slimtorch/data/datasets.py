"""Dataset bundles, the dataset registry and the small built-in datasets (digits, mnist1d, synthetic).

Every loader returns a :class:`DataBundle` of ``TensorDataset`` splits with float32 inputs normalised by
the mean/std of the training split (per channel) and int64 labels.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

from slimtorch.errors import ConfigError, DataError
from slimtorch.config import check_call_kwargs

__all__ = [
    "DataBundle",
    "register_dataset",
    "list_datasets",
    "load_dataset",
    "bundle_from_arrays",
]


@dataclass
class DataBundle:
    """Train/test (and optional validation) splits plus what a model needs to know about them."""

    train: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple
    name: str
    val: Optional[TensorDataset] = None
    mean: Optional[Tuple[float, ...]] = None  # per-channel statistics used to normalise, if any
    std: Optional[Tuple[float, ...]] = None

    def __post_init__(self):
        self.input_shape = tuple(int(s) for s in self.input_shape)
        self.num_classes = int(self.num_classes)

    def __repr__(self) -> str:
        val = f", val={len(self.val)}" if self.val is not None else ""
        return (f"DataBundle(name={self.name!r}, train={len(self.train)}, test={len(self.test)}{val}, "
                f"num_classes={self.num_classes}, input_shape={self.input_shape})")


_REGISTRY: Dict[str, Callable[..., DataBundle]] = {}


def _key(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"dataset name must be a non-empty string, got {name!r}; known datasets: "
                        f"{', '.join(list_datasets())}")
    return name.strip().lower()


def register_dataset(name: str, *, overwrite: bool = False):
    """Decorator registering ``fn(**options) -> DataBundle`` under ``name`` for :func:`load_dataset`."""
    key = _key(name)

    def deco(fn: Callable[..., DataBundle]) -> Callable[..., DataBundle]:
        if key in _REGISTRY and _REGISTRY[key] is not fn and not overwrite:
            raise ConfigError(f"dataset {key!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[key] = fn
        return fn

    return deco


def list_datasets() -> List[str]:
    """Sorted names of the registered datasets."""
    return sorted(_REGISTRY)


_check_options = check_call_kwargs


def load_dataset(name: str, **options) -> DataBundle:
    """Load a registered dataset by name (``digits``, ``mnist``, ``mnist1d``, ``synthetic``, or your own)."""
    key = _key(name)
    if key not in _REGISTRY:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())} "
                        f"(add your own with @slimtorch.data.register_dataset('name'))")
    fn = _REGISTRY[key]
    _check_options(fn, options, f"dataset {key!r}")
    try:
        bundle = fn(**options)
    except (ConfigError, DataError):
        raise
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise DataError(f"dataset {key!r} could not be loaded with {options}: {type(e).__name__}: {e}") from None
    if not isinstance(bundle, DataBundle):
        raise DataError(f"dataset {key!r}: loader returned {type(bundle).__name__}, expected a DataBundle")
    for split in ("train", "test"):
        if len(getattr(bundle, split)) == 0:
            raise DataError(f"dataset {key!r} is empty: its {split} split has 0 samples")
    return bundle


# ----------------------------------------------------------------------------------------------------
# Building bundles from arrays
# ----------------------------------------------------------------------------------------------------

def _check_limit(value, option: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"{option} must be a non-negative integer or None, got {value!r}")
    return int(value)


def _check_fraction(value, option: str, allow_zero: bool) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{option} must be a number in {'[0, 1)' if allow_zero else '(0, 1)'}, "
                          f"got {value!r}") from None
    if not ((0.0 <= value if allow_zero else 0.0 < value) and value < 1.0):
        raise ConfigError(f"{option} must be in {'[0, 1)' if allow_zero else '(0, 1)'}, got {value}")
    return value


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _channel_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) mean and std for inputs of rank >= 3, a single scalar otherwise."""
    dims = [0] + list(range(2, x.dim())) if x.dim() >= 3 else list(range(x.dim()))
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    std = var.sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean.reshape(-1), std.reshape(-1)


def _normalise_(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2) if x.dim() >= 3 and mean.numel() > 1 else ()
    m = mean.reshape(shape) if shape else mean.reshape(())
    s = std.reshape(shape) if shape else std.reshape(())
    return x.sub_(m).div_(s)


def bundle_from_arrays(name: str, x_train, y_train, x_test, y_test, *, num_classes: Optional[int] = None,
                       normalize: bool = True, val_fraction: float = 0.0, seed: int = 0,
                       limit: Optional[int] = None, limit_train: Optional[int] = None,
                       limit_test: Optional[int] = None, scale: Optional[float] = None) -> DataBundle:
    """Build a DataBundle from arrays shaped (N, *input_shape) and (N,).

    ``limit_train``/``limit_test`` (or ``limit`` for both) keep the first N samples; ``val_fraction``
    moves a seeded random part of the training split into ``val``; normalisation statistics come from
    what remains in the training split (after multiplying the inputs by ``scale``, if given, e.g. 1/255
    so that ``mean``/``std`` refer to pixels in [0, 1]).
    """
    limit = _check_limit(limit, "limit")
    limit_train = _check_limit(limit_train, "limit_train")
    limit_test = _check_limit(limit_test, "limit_test")
    limit_train = limit if limit_train is None else limit_train
    limit_test = limit if limit_test is None else limit_test
    val_fraction = _check_fraction(val_fraction, "val_fraction", allow_zero=True)
    seed = _check_seed(seed)

    x_train, y_train = np.asarray(x_train), np.asarray(y_train)
    x_test, y_test = np.asarray(x_test), np.asarray(y_test)
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.shape[:1] != y.shape[:1] or y.ndim != 1:
            raise DataError(f"dataset {name!r}: {split} inputs {x.shape} and labels {y.shape} do not match")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"dataset {name!r}: train inputs {x_train.shape[1:]} and test inputs "
                        f"{x_test.shape[1:]} differ in shape")
    if limit_train is not None:
        x_train, y_train = x_train[:limit_train], y_train[:limit_train]
    if limit_test is not None:
        x_test, y_test = x_test[:limit_test], y_test[:limit_test]
    if len(y_train) == 0 or len(y_test) == 0:
        raise DataError(f"dataset {name!r} is empty: {len(y_train)} training and {len(y_test)} test samples")

    x_val = y_val = None
    if val_fraction > 0:
        n_val = max(1, int(round(len(y_train) * val_fraction)))
        if n_val >= len(y_train):
            raise DataError(f"dataset {name!r}: val_fraction={val_fraction} leaves no training samples")
        perm = np.random.default_rng(seed).permutation(len(y_train))
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        x_val, y_val = x_train[val_idx], y_train[val_idx]
        x_train, y_train = x_train[train_idx], y_train[train_idx]

    labels = [y_train, y_test] + ([y_val] if y_val is not None else [])
    if any(y.min() < 0 for y in labels):
        raise DataError(f"dataset {name!r}: labels must be non-negative class indices")
    if num_classes is None:
        num_classes = int(max(int(y.max()) for y in labels)) + 1

    def tensors(x, y):
        # always copy: normalisation is in place and must not touch the caller's (or a cached) array
        return torch.from_numpy(np.array(x, dtype=np.float32, copy=True)), \
            torch.from_numpy(np.array(y, dtype=np.int64, copy=True))

    xtr, ytr = tensors(x_train, y_train)
    xte, yte = tensors(x_test, y_test)
    xva, yva = tensors(x_val, y_val) if x_val is not None else (None, None)
    if scale is not None:
        for x in (xtr, xte, xva):
            if x is not None:
                x.mul_(float(scale))
    mean = std = None
    if normalize:
        m, s = _channel_stats(xtr)
        for x in (xtr, xte, xva):
            if x is not None:
                _normalise_(x, m, s)
        mean, std = tuple(m.tolist()), tuple(s.tolist())
    return DataBundle(train=TensorDataset(xtr, ytr), test=TensorDataset(xte, yte), num_classes=num_classes,
                      input_shape=tuple(xtr.shape[1:]), name=name,
                      val=TensorDataset(xva, yva) if xva is not None else None, mean=mean, std=std)


# ----------------------------------------------------------------------------------------------------
# Built-in small datasets
# ----------------------------------------------------------------------------------------------------

@register_dataset("digits")
def digits(seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.0, normalize: bool = True,
           limit: Optional[int] = None, limit_train: Optional[int] = None,
           limit_test: Optional[int] = None) -> DataBundle:
    """scikit-learn's 1,797 8x8 digits, input shape (1, 8, 8), stratified seeded train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    test_fraction = _check_fraction(test_fraction, "test_fraction", allow_zero=False)
    raw = load_digits()
    x = raw.images.astype(np.float32)[:, None, :, :]
    y = raw.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y,
                                           random_state=_check_seed(seed))
    return bundle_from_arrays("digits", x[idx_train], y[idx_train], x[idx_test], y[idx_test], num_classes=10,
                              scale=1 / 16,
                              normalize=normalize, val_fraction=val_fraction, seed=seed, limit=limit,
                              limit_train=limit_train, limit_test=limit_test)


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(seed: int, num_samples: int, train_split: float, shuffle_seq: bool):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed, args.num_samples, args.train_split, args.shuffle_seq = seed, num_samples, train_split, shuffle_seq
    py_state, np_state = random.getstate(), np.random.get_state()  # make_dataset reseeds the global RNGs
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = (d["x"][:, None, :], d["y"], d["x_test"][:, None, :], d["y_test"])
    for a in arrays:
        a.setflags(write=False)
    return arrays


@register_dataset("mnist1d")
def mnist1d(seed: int = 42, num_samples: int = 5000, train_split: float = 0.8, shuffle_seq: bool = False,
            val_fraction: float = 0.0, normalize: bool = True, limit: Optional[int] = None,
            limit_train: Optional[int] = None, limit_test: Optional[int] = None) -> DataBundle:
    """MNIST-1D generated offline by ``mnist1d.data.make_dataset``; input shape (1, 40), 10 classes."""
    seed = _check_seed(seed)
    train_split = _check_fraction(train_split, "train_split", allow_zero=False)
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 0:
        raise ConfigError(f"num_samples must be a non-negative integer, got {num_samples!r}")
    x, y, xt, yt = _mnist1d_arrays(seed, int(num_samples), train_split, bool(shuffle_seq))
    return bundle_from_arrays("mnist1d", x, y, xt, yt, num_classes=10, normalize=normalize,
                              val_fraction=val_fraction, seed=seed, limit=limit, limit_train=limit_train,
                              limit_test=limit_test)


@register_dataset("synthetic")
def synthetic(n: int = 512, shape: Sequence[int] = (1, 8, 8), classes: int = 4, seed: int = 0,
              noise: float = 0.5, test_fraction: float = 0.25, val_fraction: float = 0.0,
              normalize: bool = True, limit: Optional[int] = None, limit_train: Optional[int] = None,
              limit_test: Optional[int] = None) -> DataBundle:
    """Gaussian clusters around one random prototype per class: ``n`` samples of ``shape``, learnable."""
    seed = _check_seed(seed)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or classes < 1:
        raise ConfigError(f"classes must be a positive integer, got {classes!r}")
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"shape must be a tuple of positive integers, got {shape!r}")
    test_fraction = _check_fraction(test_fraction, "test_fraction", allow_zero=False)
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((classes,) + shape).astype(np.float32)
    y = rng.permutation(np.arange(n) % classes).astype(np.int64)
    x = protos[y] + float(noise) * rng.standard_normal((n,) + shape).astype(np.float32)
    n_test = int(round(n * test_fraction))
    return bundle_from_arrays("synthetic", x[n_test:], y[n_test:], x[:n_test], y[:n_test], num_classes=classes,
                              normalize=normalize, val_fraction=val_fraction, seed=seed, limit=limit,
                              limit_train=limit_train, limit_test=limit_test)
