"""Bit packing: every width 1..8, exact sizes, the documented LSB-first stream, errors."""
import numpy as np
import pytest
import torch

from slimtorch.errors import CheckpointError, ConfigError
from slimtorch.export.bitpack import pack, pack_tensor, packed_size, unpack, unpack_tensor


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_roundtrip_and_layout(bits, n):
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(0, 1 << bits, n)
    buf = pack(codes, bits)
    assert buf.dtype == np.uint8 and buf.size == packed_size(n, bits) == -(-n * bits // 8)
    assert np.array_equal(unpack(buf, bits, n), codes)
    stream = ((codes[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    assert np.array_equal(buf, np.packbits(stream, bitorder="little"))


def test_extremes_and_tensors():
    for bits in range(1, 9):
        codes = torch.tensor([0, (1 << bits) - 1] * 13).reshape(2, 13)
        t = pack_tensor(codes, bits)
        assert t.dtype == torch.uint8
        assert torch.equal(unpack_tensor(t, bits, (2, 13)), codes)


def test_errors():
    with pytest.raises(ConfigError, match="out of range"):
        pack(np.array([0, 8]), 3)
    with pytest.raises(ConfigError, match="out of range"):
        pack(np.array([-1]), 3)
    with pytest.raises(ConfigError, match="1..8"):
        pack(np.array([0]), 9)
    with pytest.raises(CheckpointError, match="need 4"):
        unpack(np.zeros(3, np.uint8), 3, 10)
    with pytest.raises(CheckpointError, match="uint8"):
        unpack(np.zeros(4, np.int32), 3, 10)
