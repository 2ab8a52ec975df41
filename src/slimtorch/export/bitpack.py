"""Bit packing of unsigned integer codes at any width 1..8, vectorised (no per-element Python loop).

Layout (the packed-file format relies on it): a little-endian bit stream, code i occupies stream bits
[i*b, (i+1)*b), least significant bit first; byte j holds stream bits [8j, 8j+8). The stream is
zero-padded to whole bytes, so n codes take exactly ceil(n*b/8) bytes. Groups of 8 codes fill
exactly b bytes, which is how both directions work: 8 shifted adds into a uint64 per group."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError

_SHIFTS = np.arange(8, dtype=np.uint64)


def packed_size(numel: int, bits: int) -> int:
    """Bytes that ``pack`` produces for ``numel`` codes of ``bits`` bits."""
    return (numel * bits + 7) // 8


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ConfigError(f"bit width {bits!r} is not supported: expected an integer in 1..8")
    return int(bits)


def _as_numpy(codes) -> np.ndarray:
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    return np.asarray(codes).reshape(-1)


def pack(codes, bits: int) -> np.ndarray:
    """Pack integer codes in [0, 2**bits) (numpy array or tensor, any shape) into a uint8 array."""
    bits = _check_bits(bits)
    c = _as_numpy(codes)
    n = c.size
    if n and (c.min() < 0 or c.max() >= 1 << bits):
        raise ConfigError(f"codes out of range for {bits}-bit packing: min {c.min()}, max {c.max()}")
    if bits == 8:
        return c.astype(np.uint8)
    groups = -(-n // 8)
    buf = np.zeros(groups * 8, dtype=np.uint64)
    buf[:n] = c
    words = (buf.reshape(groups, 8) << (_SHIFTS * np.uint64(bits))).sum(axis=1, dtype=np.uint64)
    out = words.astype("<u8").view(np.uint8).reshape(groups, 8)[:, :bits]
    return np.ascontiguousarray(out).reshape(-1)[: packed_size(n, bits)]


def unpack(data, bits: int, numel: int) -> np.ndarray:
    """Inverse of ``pack``: the first ``numel`` codes (int64) of the ``bits``-bit stream ``data``."""
    bits = _check_bits(bits)
    d = _as_numpy(data)
    if d.dtype != np.uint8:
        raise CheckpointError(f"packed codes must be uint8, got {d.dtype}")
    need = packed_size(numel, bits)
    if d.size != need:
        raise CheckpointError(f"packed codes hold {d.size} bytes; {numel} codes at {bits} bits "
                              f"need {need}")
    if bits == 8:
        return d.astype(np.int64)
    groups = -(-numel // 8)
    raw = np.zeros((groups, 8), dtype=np.uint8)
    flat = np.zeros(groups * bits, dtype=np.uint8)
    flat[:need] = d
    raw[:, :bits] = flat.reshape(groups, bits)
    words = raw.view("<u8").reshape(groups, 1)
    codes = (words >> (_SHIFTS * np.uint64(bits))) & np.uint64((1 << bits) - 1)
    return codes.reshape(-1)[:numel].astype(np.int64)


def pack_tensor(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``pack`` returning a uint8 torch tensor."""
    return torch.from_numpy(pack(codes, bits))


def unpack_tensor(data: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """``unpack`` into an int64 tensor of ``shape``."""
    shape = tuple(int(s) for s in shape)
    return torch.from_numpy(unpack(data, bits, int(np.prod(shape, dtype=np.int64)))).reshape(shape)
