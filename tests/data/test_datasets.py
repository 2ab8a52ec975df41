"""Tests for slimtorch.data: registry, digits/mnist/mnist1d/synthetic, IDX parsing, loaders."""

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import slimtorch.data as sd
from slimtorch.data import datasets as ds_mod
from slimtorch.data import mnist as mnist_mod
from slimtorch.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]
FILES = [base for base, _ in mnist_mod.MNIST_FILES.values()]


def _real_mnist_dir():
    for d in (os.environ.get("SLIMTORCH_MNIST_DIR"), ROOT.parent / "shared" / "data" / "mnist",
              Path.cwd().parent / "shared" / "data" / "mnist"):
        if d and all(any((Path(d) / (f + ext)).is_file() for ext in ("", ".gz")) for f in FILES):
            return Path(d)
    return None


MNIST_DIR = _real_mnist_dir()
needs_mnist = pytest.mark.skipif(MNIST_DIR is None, reason="the MNIST IDX files are not available offline")


def _real_file(base):
    return next(p for p in (MNIST_DIR / (base + ".gz"), MNIST_DIR / base) if p.is_file())


def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.uint8: 0x08, np.int32: 0x0C}[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


@pytest.fixture
def sandbox_registry(monkeypatch):
    monkeypatch.setattr(ds_mod, "_REGISTRY", dict(ds_mod._REGISTRY))


# ---------------------------------------------------------------------------------------- registry

def test_unknown_dataset_lists_known_names():
    with pytest.raises(DataError) as e:
        sd.load_dataset("cifar1000")
    for name in ("digits", "mnist", "mnist1d", "synthetic", "cifar1000"):
        assert name in str(e.value)


def test_unknown_option_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="test_frac"):
        sd.load_dataset("digits", test_frac=0.3)
    with pytest.raises(ConfigError, match="test_fraction"):
        sd.load_dataset("digits", test_fraction=1.5)


def test_register_custom_dataset(sandbox_registry):
    @sd.register_dataset("Tiny")
    def tiny(n=6):
        x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
        return sd.bundle_from_arrays("tiny", x, np.arange(n) % 2, x, np.arange(n) % 2)

    assert "tiny" in sd.list_datasets()
    b = sd.load_dataset("tiny", n=8)
    assert (len(b.train), b.num_classes, b.input_shape) == (8, 2, (2,))
    with pytest.raises(ConfigError, match="already registered"):
        sd.register_dataset("tiny")(lambda: None)
    sd.register_dataset("tiny", overwrite=True)(lambda: "not a bundle")
    with pytest.raises(DataError, match="expected a DataBundle"):
        sd.load_dataset("tiny")


def test_empty_datasets_raise_naming_the_dataset(sandbox_registry, tmp_path):
    with pytest.raises(DataError, match="digits"):
        sd.load_dataset("digits", limit=0)
    with pytest.raises(DataError, match="synthetic"):
        sd.load_dataset("synthetic", n=0)
    with pytest.raises(DataError, match="mnist"):
        sd.load_dataset("mnist", root=tmp_path)  # an empty directory
    empty = TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))

    @sd.register_dataset("hollow")
    def hollow():
        return sd.DataBundle(train=empty, test=empty, num_classes=2, input_shape=(2,), name="hollow")

    with pytest.raises(DataError, match="hollow"):
        sd.load_dataset("hollow")


# ---------------------------------------------------------------------------------------- digits

def test_digits_counts_shapes_dtypes_and_stratified_split():
    b = sd.load_dataset("digits")
    assert len(b.train) + len(b.test) == 1797
    assert (len(b.train), len(b.test)) == (1437, 360)
    assert b.input_shape == (1, 8, 8) and b.num_classes == 10 and b.name == "digits" and b.val is None
    x, y = b.train.tensors
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    counts_all = np.bincount(np.concatenate([y.numpy(), b.test.tensors[1].numpy()]), minlength=10)
    counts_test = np.bincount(b.test.tensors[1].numpy(), minlength=10)
    assert np.all(np.abs(counts_test - 0.2 * counts_all) <= 1)  # stratified


def test_digits_split_is_deterministic_in_seed():
    a, b = sd.load_dataset("digits", seed=1), sd.load_dataset("digits", seed=1)
    c = sd.load_dataset("digits", seed=2)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert not torch.equal(a.test.tensors[1], c.test.tensors[1])
    assert len(sd.load_dataset("digits", test_fraction=0.5).test) in (898, 899)


def test_normalisation_uses_train_statistics():
    b = sd.load_dataset("digits")
    x = b.train.tensors[0]
    assert abs(x.mean().item()) < 1e-5 and abs(x.std(unbiased=False).item() - 1) < 1e-4
    raw = sd.load_dataset("digits", normalize=False)
    assert raw.mean is None and raw.train.tensors[0].min() == 0 and raw.train.tensors[0].max() == 1
    rx = raw.train.tensors[0]
    assert b.mean[0] == pytest.approx(rx.mean().item(), rel=1e-5)
    assert b.std[0] == pytest.approx(rx.std(unbiased=False).item(), rel=1e-5)
    # the test split uses the train statistics, not its own
    assert torch.allclose(b.test.tensors[0], (raw.test.tensors[0] - b.mean[0]) / b.std[0], atol=1e-5)


def test_validation_split():
    b = sd.load_dataset("digits", val_fraction=0.1)
    assert len(b.val) == 144 and len(b.train) == 1437 - 144 and len(b.test) == 360
    assert abs(b.train.tensors[0].mean().item()) < 1e-5


def test_bundle_from_arrays_does_not_modify_inputs():
    x = np.random.default_rng(0).random((10, 3, 2, 2)).astype(np.float32)
    before = x.copy()
    b = sd.bundle_from_arrays("arr", x, np.arange(10) % 3, x, np.arange(10) % 3)
    assert np.array_equal(x, before) and b.num_classes == 3 and len(b.mean) == 3  # per-channel stats
    m = b.train.tensors[0].mean(dim=(0, 2, 3))
    assert torch.allclose(m, torch.zeros(3), atol=1e-5)
    with pytest.raises(DataError, match="do not match"):
        sd.bundle_from_arrays("arr", x, np.arange(9), x, np.arange(10))


# ---------------------------------------------------------------------------------------- mnist1d / synthetic

def test_mnist1d_shapes_determinism_and_global_rng_untouched():
    ds_mod._mnist1d_arrays.cache_clear()
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    b = sd.load_dataset("mnist1d", num_samples=600)
    assert np.random.rand() == expected  # mnist1d reseeds the global RNG: we restore it
    assert (len(b.train), len(b.test), b.input_shape, b.num_classes) == (480, 120, (1, 40), 10)
    assert b.train.tensors[0].dtype == torch.float32 and b.train.tensors[1].dtype == torch.int64
    again = sd.load_dataset("mnist1d", num_samples=600)
    assert torch.equal(b.train.tensors[0], again.train.tensors[0])
    other = sd.load_dataset("mnist1d", num_samples=600, seed=7)
    assert not torch.equal(b.train.tensors[0], other.train.tensors[0])


def test_synthetic_options():
    b = sd.load_dataset("synthetic", n=200, shape=(3, 4, 4), classes=5, test_fraction=0.25)
    assert (len(b.train), len(b.test), b.input_shape, b.num_classes) == (150, 50, (3, 4, 4), 5)
    assert len(b.mean) == 3
    flat = sd.load_dataset("synthetic", n=40, shape=(7,), classes=2)
    assert flat.input_shape == (7,) and flat.train.tensors[0].shape[1:] == (7,)


# ---------------------------------------------------------------------------------------- IDX parsing

def test_parse_idx_roundtrip_and_errors():
    arr = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    assert np.array_equal(sd.parse_idx(_idx_bytes(arr)), arr)
    good = _idx_bytes(np.zeros((3, 2, 2), np.uint8))
    with pytest.raises(DataError, match="src.bin.*truncated IDX header"):
        sd.parse_idx(good[:2], "src.bin")
    with pytest.raises(DataError, match="truncated IDX header"):
        sd.parse_idx(good[:9], "src.bin")
    with pytest.raises(DataError, match="truncated IDX file"):
        sd.parse_idx(good[:-1], "src.bin")
    with pytest.raises(DataError, match="trailing"):
        sd.parse_idx(good + b"\0", "src.bin")
    with pytest.raises(DataError, match="bad magic"):
        sd.parse_idx(b"\x1f\x8b\x08\x00" + good[4:], "src.bin")


def _write_fake_mnist(d: Path, n_train=20, n_test=10, gz=True):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    d.mkdir(parents=True, exist_ok=True)
    for i, (base, arr) in enumerate(arrays.items()):
        data = _idx_bytes(arr)
        if gz and i % 2 == 0:  # mix gzipped and plain files
            (d / (base + ".gz")).write_bytes(gzip.compress(data))
        else:
            (d / base).write_bytes(data)
    return arrays


def test_mnist_reader_on_small_fake_files(tmp_path):
    arrays = _write_fake_mnist(tmp_path / "fake")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*checksum mismatch"):
        sd.load_dataset("mnist", root=tmp_path / "fake")
    b = sd.load_dataset("mnist", root=tmp_path / "fake", verify=False)
    assert (len(b.train), len(b.test), b.input_shape) == (20, 10, (1, 28, 28))
    assert b.train.tensors[1].tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert b.mean[0] == pytest.approx(arrays["train-images-idx3-ubyte"].mean() / 255, rel=1e-5)


def test_mnist_missing_files_message_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTORCH_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as e:
        sd.load_dataset("mnist")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "download_mnist" in msg and "SLIMTORCH_MNIST_DIR" in msg
    monkeypatch.delenv("SLIMTORCH_MNIST_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "proj").mkdir()
    monkeypatch.chdir(tmp_path / "proj")
    with pytest.raises(DataError) as e:
        sd.find_mnist_dir()
    assert str(tmp_path / "shared" / "data" / "mnist") in str(e.value)
    assert str(tmp_path / "home" / ".cache" / "slimtorch" / "mnist") in str(e.value)


# ---------------------------------------------------------------------------------------- real MNIST

@needs_mnist
def test_mnist_full_checksums_counts_and_normalisation():
    b = sd.load_dataset("mnist", root=MNIST_DIR)  # verifies all four MD5s
    assert (len(b.train), len(b.test), b.input_shape, b.num_classes) == (60000, 10000, (1, 28, 28), 10)
    assert b.train.tensors[0].shape == (60000, 1, 28, 28) and b.train.tensors[0].dtype == torch.float32
    assert b.mean[0] == pytest.approx(0.1307, abs=1e-4) and b.std[0] == pytest.approx(0.3081, abs=1e-4)
    assert abs(b.train.tensors[0].mean().item()) < 1e-4
    assert b.train.tensors[1][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert b.test.tensors[1][:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(b.train.tensors[1].numpy()).sum() == 60000


@needs_mnist
def test_mnist_limits_and_default_directories(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTORCH_MNIST_DIR", str(MNIST_DIR))
    assert sd.find_mnist_dir() == MNIST_DIR
    b = sd.load_dataset("mnist", limit_train=500, limit_test=200)
    assert (len(b.train), len(b.test)) == (500, 200)
    assert b.train.tensors[1][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    # without the env var: ../shared/data/mnist relative to the working directory
    monkeypatch.delenv("SLIMTORCH_MNIST_DIR")
    shared = tmp_path / "shared" / "data" / "mnist"
    shared.mkdir(parents=True)
    for base in FILES:
        src = _real_file(base)
        (shared / src.name).symlink_to(src)
    (tmp_path / "proj").mkdir()
    monkeypatch.chdir(tmp_path / "proj")
    assert sd.find_mnist_dir().resolve() == shared.resolve()


@needs_mnist
def test_mnist_corrupt_files_raise_naming_the_file(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for base in FILES[1:]:
        src = _real_file(base)
        (bad / src.name).symlink_to(src)
    gz = _real_file(FILES[0]).read_bytes()
    (bad / "train-images-idx3-ubyte.gz").write_bytes(gz[: len(gz) // 50])  # truncated gzip
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*(corrupt|truncated)"):
        sd.load_dataset("mnist", root=bad, limit=10)
    labels = gzip.decompress(_real_file("t10k-labels-idx1-ubyte").read_bytes())
    md5 = mnist_mod.MNIST_FILES["test_labels"][1]
    assert hashlib.md5(labels).hexdigest() == md5
    cut = tmp_path / "t10k-labels-idx1-ubyte"
    cut.write_bytes(labels[:5000])  # truncated plain IDX
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: truncated IDX file"):
        sd.read_idx(cut, md5)
    flipped = bytearray(labels)
    flipped[100] = (flipped[100] + 1) % 10
    cut.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: checksum mismatch"):
        sd.read_idx(cut, md5)
    assert len(sd.read_idx(cut)) == 10000  # parses fine without a checksum


@needs_mnist
def test_download_mnist_from_a_file_mirror(tmp_path):
    good, broken, cache = tmp_path / "good", tmp_path / "broken", tmp_path / "cache"
    good.mkdir()
    broken.mkdir()
    for base in FILES:
        src = _real_file(base)
        data = src.read_bytes() if src.suffix == ".gz" else gzip.compress(src.read_bytes())
        (good / (base + ".gz")).write_bytes(data)
    (broken / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x01x"))
    with pytest.raises(DataError, match="could not download train-images"):
        sd.download_mnist(cache, mirrors=[broken.as_uri()])
    assert list(cache.iterdir()) == []  # nothing half-written
    out = sd.download_mnist(cache, mirrors=[broken.as_uri(), good.as_uri() + "/"])
    assert out == cache and sorted(p.name for p in cache.iterdir()) == sorted(f + ".gz" for f in FILES)
    stamp = (cache / "train-labels-idx1-ubyte.gz").stat().st_mtime_ns
    sd.download_mnist(cache, mirrors=[])  # all present and valid: nothing to fetch
    assert (cache / "train-labels-idx1-ubyte.gz").stat().st_mtime_ns == stamp
    b = sd.load_dataset("mnist", root=cache, limit_train=5, limit_test=5)
    assert b.train.tensors[1].tolist() == [5, 0, 4, 1, 9]


# ---------------------------------------------------------------------------------------- loaders

class _ListDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _bundle():
    return sd.load_dataset("synthetic", n=100, test_fraction=0.3)


def test_epoch_seed_is_stable():
    assert sd.epoch_seed(0, 0) == 6569863346532939966  # changing the scheme breaks old checkpoints
    assert sd.epoch_seed(1234, 7) == 3921276100816669753
    with pytest.raises(ConfigError):
        sd.epoch_seed(-1, 0)


def test_train_order_is_a_function_of_seed_and_epoch():
    b = _bundle()
    tr1, te = sd.make_loaders(b, batch_size=16, seed=3)
    tr2, _ = sd.make_loaders(b, batch_size=16, seed=3)
    tr3, _ = sd.make_loaders(b, batch_size=16, seed=4)
    for e in range(3):
        assert torch.equal(tr1.order(e), tr2.order(e))
        assert sorted(tr1.order(e).tolist()) == list(range(70))
    assert not torch.equal(tr1.order(0), tr1.order(1))
    assert not torch.equal(tr1.order(0), tr3.order(0))
    assert len(tr1) == 5 and torch.equal(te.order(5), torch.arange(30))
    # plain iteration walks epochs 0, 1, ...; set_epoch jumps
    first, second = [y for _, y in tr1], [y for _, y in tr1]
    assert torch.equal(torch.cat(first), b.train.tensors[1][tr2.order(0)])
    assert torch.equal(torch.cat(second), b.train.tensors[1][tr2.order(1)])
    tr1.set_epoch(7)
    assert torch.equal(torch.cat([y for _, y in tr1]), b.train.tensors[1][tr2.order(7)])


def test_resume_skips_batches_of_the_same_epoch():
    b = _bundle()
    tr, _ = sd.make_loaders(b, batch_size=16, seed=0)
    full = list(tr.batches(2))
    resumed = list(sd.make_loaders(b, batch_size=16, seed=0)[0].batches(2, start=3))
    assert len(full) == 5 and len(resumed) == 2 and len(tr.batches(2, start=3)) == 2
    assert len(list(tr.batches(0, start=5))) == 0
    for (xa, ya), (xb, yb) in zip(full[3:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert [len(y) for _, y in full] == [16, 16, 16, 16, 6]
    dl, _ = sd.make_loaders(b, batch_size=16, seed=0, drop_last=True)
    assert len(dl) == 4 and all(len(y) == 16 for _, y in dl)


def test_replicas_partition_each_epoch():
    b = _bundle()  # 70 training samples
    ranks = [sd.make_loaders(b, 8, seed=1, num_replicas=3, rank=r)[0] for r in range(3)]
    orders = [r.order(4) for r in ranks]
    assert all(len(o) == 24 for o in orders)
    assert set(torch.cat(orders).tolist()) == set(range(70))
    with pytest.raises(ConfigError):
        sd.make_loaders(b, 8, num_replicas=2, rank=2)


def test_generic_dataset_matches_tensor_dataset():
    b = _bundle()
    x, y = b.train.tensors
    fast = sd.make_loader(b.train, 16, seed=5)
    slow = sd.make_loader(_ListDataset(x, y), 16, seed=5)
    for (xa, ya), (xb, yb) in zip(fast.batches(1, start=1), slow.batches(1, start=1)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ConfigError, match="batch_size"):
        sd.make_loader(b.train, 0)
