"""MNIST from a directory of the four IDX files (gzipped or not), checksum-verified; optional download."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from slimtorch.data.datasets import DataBundle, bundle_from_arrays, register_dataset
from slimtorch.atomic import atomic_write_bytes
from slimtorch.errors import DataError

__all__ = ["MNIST_FILES", "MNIST_MIRRORS", "MNIST_ENV", "parse_idx", "read_idx", "mnist_search_dirs",
           "find_mnist_dir", "read_mnist", "download_mnist", "mnist"]

MNIST_ENV = "SLIMTORCH_MNIST_DIR"
# Canonical MD5 of the *uncompressed* IDX files.
MNIST_FILES: Dict[str, Tuple[str, str]] = {
    "train_images": ("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
    "train_labels": ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
    "test_images": ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
    "test_labels": ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
}
MNIST_MIRRORS: Tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
PathLike = Union[str, os.PathLike]


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an (uncompressed) IDX file; DataError naming ``source`` if malformed."""
    if len(data) < 4:
        raise DataError(f"{source}: truncated IDX header ({len(data)} bytes, need at least 4)")
    z0, z1, code, ndim = data[0], data[1], data[2], data[3]
    if z0 != 0 or z1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{source}: not an IDX file (bad magic number 0x{data[:4].hex()})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: truncated IDX header ({len(data)} bytes, the {ndim} dimensions need {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "malformed (trailing bytes)"
        raise DataError(f"{source}: {kind} IDX file: header dims {tuple(dims)} need {expected} bytes, "
                        f"file has {len(data)}")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False) if dtype.byteorder == ">" else arr


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e}") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip file: {e}") from None
    return raw


def read_idx(path: PathLike, md5: Optional[str] = None) -> np.ndarray:
    """Read an IDX file (``.gz`` is decompressed); if ``md5`` is given, check the uncompressed bytes."""
    path = Path(path)
    data = _read_bytes(path)
    arr = parse_idx(data, str(path))
    if md5 is not None:
        got = hashlib.md5(data).hexdigest()
        if got != md5.lower():
            raise DataError(f"{path}: checksum mismatch: MD5 of the uncompressed bytes is {got}, expected {md5}")
    return arr


def _candidates(directory: Path, base: str) -> List[Path]:
    alt = base.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    return [directory / n for n in (base, base + ".gz", alt, alt + ".gz")]


def _find_file(directory: Path, base: str) -> Optional[Path]:
    return next((p for p in _candidates(directory, base) if p.is_file()), None)


def mnist_search_dirs() -> List[Path]:
    """Where MNIST is looked for: ``$SLIMTORCH_MNIST_DIR`` if set, else ../shared/data/mnist, ~/.cache/..."""
    env = os.environ.get(MNIST_ENV)
    if env:
        return [Path(env).expanduser()]
    return [Path.cwd().parent / "shared" / "data" / "mnist", Path.home() / ".cache" / "slimtorch" / "mnist"]


def _default_cache() -> Path:
    return Path.home() / ".cache" / "slimtorch" / "mnist"


def find_mnist_dir(root: Optional[PathLike] = None) -> Path:
    """The directory holding all four IDX files: ``root`` if given, else the first of the search dirs."""
    dirs = [Path(root).expanduser()] if root is not None else mnist_search_dirs()
    looked = []
    for d in dirs:
        if not d.is_dir():
            looked.append(f"{d} (no such directory)")
            continue
        missing = [base for base, _ in MNIST_FILES.values() if _find_file(d, base) is None]
        if not missing:
            return d
        looked.append(f"{d} (missing {', '.join(m + '[.gz]' for m in missing)})")
    raise DataError(
        "dataset 'mnist': IDX files not found. Looked in: " + "; ".join(looked) + ". Put the four files "
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
        f"(gzipped or not) in one directory and pass root=... or set {MNIST_ENV}; with a network, download "
        f"them with `python -c \"import slimtorch.data as d; d.download_mnist('{_default_cache()}')\"`.")


def read_mnist(root: Optional[PathLike] = None, verify: bool = True
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read (x_train, y_train, x_test, y_test) as uint8 arrays; checksums verified unless ``verify=False``."""
    d = find_mnist_dir(root)
    out = {}
    for key, (base, md5) in MNIST_FILES.items():
        path = _find_file(d, base)
        arr = read_idx(path, md5 if verify else None)
        want_ndim = 3 if key.endswith("images") else 1
        if arr.ndim != want_ndim:
            raise DataError(f"{path}: expected a {want_ndim}-D IDX array, got shape {arr.shape}")
        out[key] = (path, arr)
    for split in ("train", "test"):
        (pi, xi), (pl, yl) = out[f"{split}_images"], out[f"{split}_labels"]
        if len(xi) != len(yl):
            raise DataError(f"{pi} has {len(xi)} images but {pl} has {len(yl)} labels")
    return tuple(out[k][1] for k in ("train_images", "train_labels", "test_images", "test_labels"))


@register_dataset("mnist")
def mnist(root: Optional[PathLike] = None, verify: bool = True, seed: int = 0, val_fraction: float = 0.0,
          normalize: bool = True, limit: Optional[int] = None, limit_train: Optional[int] = None,
          limit_test: Optional[int] = None) -> DataBundle:
    """MNIST, input shape (1, 28, 28), 60,000/10,000 samples (``limit_train``/``limit_test`` keep the first N)."""
    x, y, xt, yt = read_mnist(root, verify=verify)
    return bundle_from_arrays("mnist", x[:, None], y, xt[:, None], yt, scale=1 / 255, num_classes=10,
                              normalize=normalize, val_fraction=val_fraction, seed=seed, limit=limit,
                              limit_train=limit_train, limit_test=limit_test)


def _verified(path: Path, md5: str) -> bool:
    try:
        read_idx(path, md5)
        return True
    except DataError:
        return False


_atomic_write = atomic_write_bytes


def download_mnist(cache_dir: Optional[PathLike] = None, *, mirrors: Sequence[str] = MNIST_MIRRORS,
                   overwrite: bool = False, timeout: float = 60.0) -> Path:
    """Download the four gzipped IDX files into ``cache_dir`` (default ~/.cache/slimtorch/mnist).

    Each file is checksum-verified before it is written (atomically, temp file + ``os.replace``); files
    already present and valid are kept unless ``overwrite``. Returns the directory. Needs a network.
    """
    d = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache()
    d.mkdir(parents=True, exist_ok=True)
    for base, md5 in MNIST_FILES.values():
        target = d / (base + ".gz")
        if target.is_file() and not overwrite and _verified(target, md5):
            continue
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + base + ".gz"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    data = r.read()
                raw = gzip.decompress(data)
                parse_idx(raw, url)
                got = hashlib.md5(raw).hexdigest()
                if got != md5:
                    raise DataError(f"checksum mismatch: MD5 {got}, expected {md5}")
            except (OSError, EOFError, zlib.error, ValueError) as e:  # URLError is an OSError
                errors.append(f"{url}: {e}")
                continue
            _atomic_write(target, data)
            break
        else:
            raise DataError(f"could not download {base}.gz: " + "; ".join(errors))
    return d
