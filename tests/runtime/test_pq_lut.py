"""LUT matmul (runtime/pq_lut.py): equals the rebuilt dense matmul within float rounding, for
batch 1 and many, with and without bias, 2-D and 3-D inputs, chunked tables; PQLinear modes."""
import pytest
import torch
import torch.nn.functional as F

from slimtorch.runtime.pq_lut import PQLinear, dense_weight, lut_index, lut_matmul, lut_table

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(out=12, in_features=16, k=8, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(k, d, generator=g)
    codes = torch.randint(0, k, (out, in_features // d), generator=g)
    return c, codes, torch.randn(out, generator=g)


def test_table_is_every_block_dot_every_centroid():
    c, _, _ = _layer()
    x = torch.randn(3, 16)
    t = lut_table(x, c).view(8, 4, 3)                       # (K, J, N)
    ref = torch.einsum("njd,kd->kjn", x.view(3, 4, 4), c)
    torch.testing.assert_close(t, ref)


def test_index_rows_are_code_times_blocks_plus_block():
    codes = torch.tensor([[3, 0, 1], [2, 2, 0]], dtype=torch.uint8)
    idx = lut_index(codes, 4)
    assert idx.dtype == torch.int32
    assert idx.tolist() == [[9, 1, 5], [6, 7, 2]]


@pytest.mark.parametrize("shape", [(1, 16), (37, 16), (2, 5, 16)], ids=["batch1", "batch37", "3d"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_lut_equals_rebuilt_dense_matmul(shape, with_bias):
    c, codes, b = _layer()
    b = b if with_bias else None
    x = torch.randn(*shape)
    y = lut_matmul(x, c, lut_index(codes, 8), b)
    assert y.shape == (*shape[:-1], 12)
    torch.testing.assert_close(y, F.linear(x, dense_weight(c, codes, 16), b), rtol=1e-5, atol=1e-5)


def test_chunked_table_gives_the_same_result():
    c, codes, b = _layer()
    x = torch.randn(2, 9, 16)
    idx = lut_index(codes, 8)
    whole = lut_matmul(x, c, idx, b)
    for limit in (1, 32, 8 * 4 * 5):                      # 1 row, 1 row, 5 rows per chunk
        torch.testing.assert_close(lut_matmul(x, c, idx, b, table_elements=limit), whole)


def test_wrong_feature_count_is_refused():
    c, codes, _ = _layer()
    with pytest.raises(ValueError, match="input has 15 features"):
        lut_matmul(torch.randn(2, 15), c, lut_index(codes, 8))


@pytest.mark.parametrize("mode", ["lut", "dense", "auto"])
def test_pq_linear_modes(mode):
    c, codes, b = _layer(out=10, in_features=12, k=16, d=3)
    m = PQLinear(c, codes, 12, b, mode=mode)
    assert m.kernel in ("lut", "dense") and m.out_features == 10 and m.codes.dtype == torch.uint8
    x = torch.randn(4, 3, 12)
    ref = F.linear(x, dense_weight(c, codes, 12), b)
    if m.kernel == "dense":
        assert torch.equal(m(x), ref)                      # the fake-quant layer's arithmetic
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_pq_linear_dense_cache_follows_dtype_and_bad_mode_is_refused():
    c, codes, b = _layer()
    m = PQLinear(c, codes, 16, b, mode="dense")
    w = m.weight
    assert m.weight is w and torch.equal(w, dense_weight(c, codes, 16))
    m.double()
    assert m.weight.dtype == torch.float64 and m(torch.randn(2, 16, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match="mode='fast'"):
        PQLinear(c, codes, 16, b, mode="fast")
    with pytest.raises(ValueError, match="do not make rows"):
        PQLinear(c, codes, 15, b)
