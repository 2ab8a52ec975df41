"""The Codebook weight transform (pq/codebook.py): the rebuilt weight is centroids[codes]
reshaped, the stored float weight is untouched, and the centroid gradient is the MEAN of the
assigned blocks' gradients for every layer type (fairseq averages for Conv2d only)."""
import pytest
import torch
from torch import nn

from slimtorch.attach import raw_weight
from slimtorch.pq import PQ, Codebook, codebook_of, pq_
from slimtorch.pq.codebook import int8_dequant

LAYERS = {
    "linear": (lambda: nn.Linear(16, 6), lambda: torch.randn(3, 16)),
    "conv2d_3x3": (lambda: nn.Conv2d(3, 4, 3), lambda: torch.randn(2, 3, 5, 5)),
    "conv2d_1x1": (lambda: nn.Conv2d(8, 6, 1), lambda: torch.randn(2, 8, 3, 3)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 2), lambda: torch.randn(2, 4, 7)),
    "embedding": (lambda: nn.Embedding(12, 8), lambda: torch.tensor([[1, 3, 3], [0, 11, 5]])),
}


def _pq_layer(kind, k=5, int8=False):
    torch.manual_seed(0)
    make, inp = LAYERS[kind]
    layer = make()
    w0 = layer.weight.detach().clone()
    pq_(layer, PQ(n_centroids=k, n_iter=5, int8_centroids=int8))
    return layer, w0, inp()


@pytest.mark.parametrize("kind", list(LAYERS))
def test_centroid_gradient_is_the_mean_of_the_assigned_blocks_gradients(kind):
    layer, _, x = _pq_layer(kind)
    cb = codebook_of(layer)
    dense = LAYERS[kind][0]()
    with torch.no_grad():
        dense.weight.copy_(layer.weight)
        if getattr(dense, "bias", None) is not None:
            dense.bias.copy_(layer.bias)
    r = torch.randn_like(layer(x))
    (layer(x) * r).sum().backward()
    (dense(x) * r).sum().backward()
    g = dense.weight.grad.reshape(-1, cb.block_size)
    codes = cb.codes.long()
    want = torch.zeros_like(cb.centroids)
    for k in range(cb.n_centroids):
        if (codes == k).any():
            want[k] = g[codes == k].mean(0)
    torch.testing.assert_close(cb.centroids.grad, want, rtol=1e-5, atol=1e-6)
    assert raw_weight(layer).grad is None


@pytest.mark.parametrize("kind", list(LAYERS))
def test_rebuilt_weight_is_centroids_at_codes_and_the_stored_weight_is_untouched(kind):
    layer, w0, _ = _pq_layer(kind)
    cb = codebook_of(layer)
    assert torch.equal(layer.weight, cb.centroids[cb.codes.long()].reshape(w0.shape))
    assert torch.equal(raw_weight(layer), w0) and not raw_weight(layer).requires_grad


def test_a_centroid_with_no_assigned_block_gets_zero_gradient():
    c = torch.randn(4, 2, requires_grad=False)
    cb = Codebook(c, torch.tensor([0, 1, 1, 3, 0, 3], dtype=torch.uint8), (3, 4))
    w = cb(torch.zeros(3, 4))
    (w * torch.arange(12.0).reshape(3, 4)).sum().backward()
    assert torch.equal(cb.centroids.grad[2], torch.zeros(2))
    assert torch.allclose(cb.centroids.grad[1], torch.tensor([(2 + 4) / 2, (3 + 5) / 2]))


def test_int8_centroids_are_on_the_int8_grid_with_a_straight_through_mean_gradient():
    layer, _, x = _pq_layer("linear", int8=True)
    cb = codebook_of(layer)
    q, scale = cb.int8_state()
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert torch.equal(layer.weight, int8_dequant(q, scale)[cb.codes.long()].reshape(6, 16))
    layer(x).sum().backward()
    assert cb.centroids.grad is not None and cb.centroids.grad.abs().sum() > 0


def test_wrong_shapes_are_refused():
    with pytest.raises(ValueError, match="do not fill a weight of shape"):
        Codebook(torch.zeros(4, 2), torch.zeros(5, dtype=torch.uint8), (3, 4))
    cb = Codebook(torch.zeros(4, 2), torch.zeros(6, dtype=torch.uint8), (3, 4))
    with pytest.raises(RuntimeError, match="received shape"):
        cb(torch.zeros(4, 3))
