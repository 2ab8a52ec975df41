"""k-means on sub-vectors (pq/kmeans.py): the objective never increases, empty clusters are split
from the most populated one, the result is deterministic under a seed, more centroids than
sub-vectors fall back with a warning, and the chunked E-step is the exact argmin."""
import pytest
import torch

from slimtorch.pq import kmeans as km
from slimtorch.pq.kmeans import assign, code_bits, code_dtype, kmeans, objective


def _blobs(n_per=40, k=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 5
    return (centers.repeat_interleave(n_per, 0) + 0.3 * torch.randn(k * n_per, d, generator=g))


def test_objective_never_increases_and_matches_the_direct_sum():
    x = torch.randn(3000, 4, generator=torch.Generator().manual_seed(1))
    r = kmeans(x, 64, n_iter=15, seed=0)
    h = r.objective
    assert len(h) == r.iterations >= 5
    assert all(b <= a * (1 + 1e-9) for a, b in zip(h, h[1:])), h
    assert h[-1] == pytest.approx(objective(x, r.centroids, r.codes), rel=1e-6)


def test_empty_clusters_are_split_from_the_most_populated():
    x = _blobs()
    init = torch.stack([x[0], x[0], x[0], x[0], x[100], x[200]])     # four copies: three start empty
    r = kmeans(x, 6, n_iter=1, init=init)
    counts = torch.bincount(r.codes.long(), minlength=6)
    assert (counts > 0).all(), counts
    full = kmeans(x, 6, n_iter=30, init=init)
    assert (torch.bincount(full.codes.long(), minlength=6) > 0).all()
    assert full.objective[-1] < kmeans(x, 6, n_iter=1, init=init).objective[-1]


def test_duplicate_data_with_fewer_distinct_rows_than_centroids():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]).repeat(20, 1)   # 3 distinct rows, K = 5
    r = kmeans(x, 5, n_iter=5, seed=3)
    assert r.codes.shape == (60,) and int(r.codes.max()) < 5
    assert objective(x, r.centroids, r.codes) == 0.0
    assert all(b <= a for a, b in zip(r.objective, r.objective[1:]))


def test_deterministic_under_seed():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(2))
    a, b = kmeans(x, 16, n_iter=5, seed=7), kmeans(x, 16, n_iter=5, seed=7)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.codes, b.codes)
    assert not torch.equal(a.centroids, kmeans(x, 16, n_iter=5, seed=8).centroids)


def test_more_centroids_than_subvectors_fall_back_with_a_warning():
    x = torch.randn(10, 4)
    with pytest.warns(UserWarning, match="layer 'fc': 16 centroids asked for 10 sub-vectors; using 10"):
        r = kmeans(x, 16, what="layer 'fc'")
    assert r.n_centroids == 10
    assert objective(x, r.centroids, r.codes) == 0.0


def test_chunked_assign_is_the_exact_argmin(monkeypatch):
    g = torch.Generator().manual_seed(4)
    x, c = torch.randn(1000, 8, generator=g), torch.randn(300, 8, generator=g)
    want = torch.cdist(x.double(), c.double()).argmin(1)
    monkeypatch.setattr(km, "CHUNK_ELEMENTS", 300 * 70)       # 70 rows per chunk, a ragged last chunk
    assert torch.equal(assign(x, c), want)


def test_code_dtypes_and_bits():
    assert code_dtype(256) == torch.uint8 and code_dtype(257) == torch.int16 and code_dtype(40000) == torch.int32
    assert [code_bits(k) for k in (1, 2, 3, 256, 257)] == [1, 1, 2, 8, 9]
    r = kmeans(torch.randn(600, 2), 300, n_iter=2)
    assert r.codes.dtype == torch.int16


def test_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        kmeans(torch.zeros(0, 4), 4)
    with pytest.raises(ValueError, match="init has shape"):
        kmeans(torch.randn(20, 4), 4, init=torch.zeros(3, 4))
