"""Quant-Noise mode "pq_exact" (pq/noise_exact.py): p = 1 forward is the PQ-rebuilt weight, selected
blocks take exactly their centroid, straight-through gradient, stored weight never modified, the
codebook refits on the st.step schedule, costs nothing, p per mode."""
import copy
import math

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.attach import raw_weight
from slimtorch.checkpoint import load_checkpoint, save_checkpoint
from slimtorch.cost import model_costs
from slimtorch.pq import ExactPQNoise, noise_transform, refresh_quant_noise_, to_blocks
from slimtorch.pq.kmeans import assign, kmeans

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = {"linear": (lambda: nn.Linear(16, 6), lambda: torch.randn(5, 16)),
          "conv3x3": (lambda: nn.Conv2d(3, 4, 3), lambda: torch.randn(2, 3, 6, 6)),
          "conv1x1": (lambda: nn.Conv2d(8, 4, 1), lambda: torch.randn(2, 8, 4, 4)),
          "conv1d": (lambda: nn.Conv1d(2, 4, 3), lambda: torch.randn(2, 2, 7)),
          "embedding": (lambda: nn.Embedding(10, 16), lambda: torch.randint(0, 10, (3, 4)))}


def _noisy(kind="linear", **cfg):
    torch.manual_seed(0)
    net = nn.Sequential(LAYERS[kind][0]())
    return st.quant_noise_(net, st.QuantNoise(mode="pq_exact", **{"n_centroids": 4, **cfg}))


@pytest.mark.parametrize("kind", list(LAYERS))
def test_p1_forward_is_the_pq_rebuilt_weight_and_stored_weight_unchanged(kind):
    net = _noisy(kind, p=1.0, n_iter=100)                               # converged: codes = nearest centroids
    ref = copy.deepcopy(net)
    st.remove_quant_noise_(ref)
    st.pq_(ref, st.PQ(n_centroids=4, n_iter=100), freeze=False)
    before = raw_weight(net[0]).detach().clone()
    assert torch.equal(net[0].weight, ref[0].weight)                    # W_used = C[codes], bit-exact
    x = LAYERS[kind][1]()
    for _ in range(3):
        net(x).square().sum().backward()
    assert torch.equal(raw_weight(net[0]), before) and raw_weight(net[0]).grad is not None
    net.eval()
    assert torch.equal(net[0].weight, before)                           # identity in eval


def test_selected_blocks_take_their_centroid_straight_through():
    torch.manual_seed(0)
    net = st.quant_noise_(nn.Sequential(nn.Linear(64, 32)),
                          st.QuantNoise(mode="pq_exact", p=0.3, n_centroids=8, block_size=4))
    t, W = noise_transform(net[0]), raw_weight(net[0]).detach()
    Q = t.centroids[assign(to_blocks(W, 4), t.centroids)].reshape(W.shape)     # the nearest centroids
    W_used = net[0].weight
    b, bw, bq = (v.detach().reshape(32, 16, 4) for v in (W_used, W, Q))
    took = (b == bq).all(-1) & (bw != bq).any(-1)
    kept = (b == bw).all(-1)
    assert (took | kept).all()                                          # whole blocks, exact values
    n = 32 * 16
    assert abs(int(took.sum()) - 0.3 * n) < 4.5 * math.sqrt(n * 0.3 * 0.7)
    G = torch.randn_like(W)
    (W_used * G).sum().backward()
    assert torch.equal(raw_weight(net[0]).grad, G)                      # gradient 1 everywhere


def test_codebook_refits_every_update_every_steps():
    net = _noisy(p=1.0, update_every=3)
    t = noise_transform(net[0])
    assert isinstance(t, ExactPQNoise) and int(t.refreshes) == 0
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    seen = []
    for i in range(1, 8):
        net(torch.randn(4, 16)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        c = t.centroids.clone()
        st.step(net)
        seen.append((int(t.steps), int(t.refreshes), not torch.equal(c, t.centroids)))
    assert [s[:2] for s in seen] == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 2), (7, 2)]
    assert [s[2] for s in seen] == [False, False, True, False, False, True, False]
    prev = t.centroids.clone()
    assert refresh_quant_noise_(net) == 1                                # k-means on the current W, warm start
    want = kmeans(to_blocks(raw_weight(net[0]).detach(), 8), 4, 20, init=prev)
    assert torch.equal(t.centroids, want.centroids)


def test_checkpoint_holds_the_codebook_and_costs_ignore_it(tmp_path):
    net = _noisy(p=0.5, update_every=2)
    plain = nn.Sequential(nn.Linear(16, 6))
    assert model_costs(net)["bytes"] == model_costs(plain)["bytes"]
    save_checkpoint(tmp_path / "c.ckpt", model=net)
    other = _noisy(p=0.5, update_every=2)
    with torch.no_grad():
        noise_transform(other[0]).centroids.zero_()
    load_checkpoint(tmp_path / "c.ckpt", model=other, restore_rng=False)
    assert torch.equal(noise_transform(other[0]).centroids, noise_transform(net[0]).centroids)
    info = st.save_packed(net, tmp_path / "m.slim")
    assert info["file_bytes"] > 0
    loaded = st.load_packed(tmp_path / "m.slim", lambda: nn.Sequential(nn.Linear(16, 6)))
    assert torch.equal(loaded[0].weight, raw_weight(net[0]))


@pytest.mark.parametrize("kw,match", [
    ({"mode": "pq_exact", "p": 0.0}, r"p=0.0 outside \(0, 1\] for mode 'pq_exact'"),
    ({"mode": "pq_exact", "p": 1.5}, r"outside \(0, 1\]"),
    ({"mode": "pq", "p": 1.0}, r"p=1.0 outside \[0, 1\) for mode 'pq'.*only with mode 'pq_exact'"),
    ({"mode": "scalar", "p": 1.0}, r"outside \[0, 1\) for mode 'scalar'"),
    ({"mode": "pq", "n_centroids": 16}, r"n_centroids=16 applies to mode 'pq_exact' only"),
    ({"mode": "pq_exact", "update_every": 0}, r"update_every=0; expected an integer >= 1"),
    ({"mode": "pq_exact", "n_centroids": 1}, r"n_centroids=1; expected an integer in 2..65536"),
])
def test_bad_values_per_mode(kw, match):
    with pytest.raises(st.ConfigError, match=match):
        st.QuantNoise(**kw)


def test_stacks_after_a_mask():
    """Under a pruning mask the codebook is fitted to W * M (what the transform receives)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 8))
    st.prune_(net, st.Magnitude(remaining=0.25))
    st.quant_noise_(net, st.QuantNoise(mode="pq_exact", p=1.0, n_centroids=4))
    t = noise_transform(net[0])
    assert list(net[0].parametrizations.weight)[1] is t
    M = net[0].parametrizations.weight[0].mask_for(raw_weight(net[0]))
    want = kmeans(to_blocks(raw_weight(net[0]).detach() * M, 8), 4, 20, seed=0)
    assert torch.equal(t.centroids, want.centroids)
    net(torch.randn(2, 32)).sum().backward()
