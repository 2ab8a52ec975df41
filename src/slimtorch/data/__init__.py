"""Datasets that work offline (digits, MNIST from IDX files, mnist1d, synthetic) and resumable loaders.

>>> bundle = load_dataset("digits", seed=0)
>>> train, test = make_loaders(bundle, batch_size=64, seed=0)
>>> for x, y in train.batches(epoch=3, start=5): ...   # epoch 3's order, skipping 5 batches
>>> slimtorch.train.train(model, train.batches, config)  # train_batches(epoch) for the trainer
"""

from slimtorch.data.datasets import (
    DataBundle,
    bundle_from_arrays,
    list_datasets,
    load_dataset,
    register_dataset,
)
from slimtorch.data.loaders import (
    EpochBatches,
    EpochLoader,
    epoch_generator,
    epoch_seed,
    make_loader,
    make_loaders,
)
from slimtorch.data.mnist import (
    MNIST_FILES,
    MNIST_MIRRORS,
    download_mnist,
    find_mnist_dir,
    mnist_search_dirs,
    parse_idx,
    read_idx,
    read_mnist,
)

__all__ = [
    "DataBundle", "bundle_from_arrays", "list_datasets", "load_dataset", "register_dataset",
    "EpochBatches", "EpochLoader", "epoch_generator", "epoch_seed", "make_loader", "make_loaders",
    "MNIST_FILES", "MNIST_MIRRORS", "download_mnist", "find_mnist_dir", "mnist_search_dirs", "parse_idx",
    "read_idx", "read_mnist",
]
