"""The PQ verbs (pq/api.py): pq_ attaches codebooks (atomic block-size checks, stacking with masks
and scalar quantizers), freezes the stored weights, and iPQ stages quantize layer groups one at a
time with only centroids and not-yet-quantized weights training in between."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch as st
from slimtorch.attach import raw_weight, weight_transforms
from slimtorch.errors import ConfigError
from slimtorch.pq import codebook_of, freeze_quantized_weights_


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.attn = nn.Linear(8, 8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x).mean(1)
        h = h + self.attn(h)
        return self.out(h + self.fc2(F.relu(self.fc1(h))))


def _net():
    torch.manual_seed(0)
    return Net()


CFG = st.PQ(n_centroids=8, n_iter=5)


def test_pq_attaches_codebooks_and_freezes_the_stored_weights():
    m = _net()
    before = {n: raw_weight(l).detach().clone() for n, l in m.named_children()}
    st.pq_(m, CFG, exclude="out")
    assert [n for n, _, _ in st.pq_layers(m)] == ["emb", "attn", "fc1", "fc2"]
    for n, layer, cb in st.pq_layers(m):
        assert torch.equal(raw_weight(layer), before[n]) and not raw_weight(layer).requires_grad
        assert cb.n_centroids == 8 and cb.block_size == 8
    assert raw_weight(m.out).requires_grad and codebook_of(m.out) is None
    with pytest.raises(ConfigError, match="'fc1' is already product-quantized"):
        st.pq_(m, CFG, include="fc1")
    with pytest.raises(ConfigError, match="expected a PQ config"):
        st.pq_(m, st.Magnitude(), include="out")


def test_block_sizes_are_checked_before_any_layer_is_touched():
    m = _net()
    with pytest.raises(ConfigError, match=r"layer 'out' \(Linear, weight \[3, 8\]\): block_size 16"):
        st.pq_(m, st.PQ(block_size=16), include=["fc2", "out"])
    assert not list(st.pq_layers(m))


def test_pq_of_a_pruned_layer_quantizes_w_times_m():
    m = _net()
    st.prune_(m, st.Magnitude(remaining=0.5), include="fc1")
    masked = m.fc1.weight.detach().clone()
    with pytest.warns(UserWarning, match="using 16 centroids"):
        st.pq_(m, st.PQ(n_centroids=64), include="fc1")      # one centroid per block: exact
    assert torch.equal(m.fc1.weight, masked) and (masked == 0).float().mean() == 0.5


@pytest.mark.parametrize("pq_first", [True, False])
def test_the_codebook_goes_before_a_scalar_quantizer(pq_first):
    m = _net()
    steps = [lambda: st.pq_(m, CFG, include="fc1"), lambda: st.quantize_(m, st.LSQ(w_bits=4), include="fc1")]
    for s in steps if pq_first else steps[::-1]:
        s()
    chain = [type(t).__name__ for t in weight_transforms(m.fc1)]
    assert chain == ["Codebook", "LSQQuantizer"]


def test_ipq_stages_quantize_group_by_group_with_only_centroids_and_unquantized_weights_training():
    m = _net()
    x, y = torch.randint(0, 20, (16, 5)), torch.randint(0, 3, (16,))
    stages = st.ipq_stages(m, [["fc1", "fc2"], "emb", "*"], [CFG, CFG, st.PQ(n_centroids=4, block_size=4)])
    seen = []
    for stage in stages:
        seen.append(stage.layers)
        frozen = {n: raw_weight(l).detach().clone() for n, l, _ in st.pq_layers(m)}
        codes = {n: cb.codes.clone() for n, _, cb in st.pq_layers(m)}
        free = {n: l.weight.detach().clone() for n, l in m.named_children() if codebook_of(l) is None}
        cents = {n: cb.centroids.detach().clone() for n, _, cb in st.pq_layers(m)}
        opt = torch.optim.SGD(st.pq_param_groups(m, lr=0.5), lr=0.5)
        F.cross_entropy(m(x), y).backward()
        opt.step(); opt.zero_grad(); st.step(m)
        for n, layer, cb in st.pq_layers(m):
            assert torch.equal(raw_weight(layer), frozen[n]) and torch.equal(cb.codes, codes[n])
            assert not torch.equal(cb.centroids, cents[n])
        for n, w in free.items():
            assert not torch.equal(m.get_submodule(n).weight, w)
    assert seen == [("fc1", "fc2"), ("emb",), ("attn", "out")]
    assert codebook_of(m.out).block_size == 4


def test_ipq_stage_errors():
    m = _net()
    with pytest.raises(ConfigError, match="2 configs for 3 stages"):
        next(st.ipq_stages(m, ["fc1", "fc2", "emb"], [CFG, CFG]))
    with pytest.raises(ConfigError, match="non-empty list"):
        next(st.ipq_stages(m, "fc1"))


def test_a_tied_weight_keeps_training_for_the_layer_that_is_not_quantized():
    m = _net()
    head = nn.Linear(8, 20, bias=False)
    head.weight = m.emb.weight
    m.head = head
    st.pq_(m, CFG, include="emb")
    assert m.head.weight.requires_grad and freeze_quantized_weights_(m) == []
    ids = {id(p) for g in st.pq_param_groups(m, lr=0.1) for p in g["params"]}
    assert id(m.head.weight) in ids and id(codebook_of(m.emb).centroids) in ids


def test_param_groups_put_centroids_apart_without_weight_decay():
    m = _net()
    st.pq_(m, CFG, include=["fc1", "fc2"])
    groups = st.pq_param_groups(m, lr=0.1, centroids_lr=0.01, weight_decay=0.1)
    assert [g["lr"] for g in groups] == [0.1, 0.01] and groups[1]["weight_decay"] == 0.0
    assert len(groups[1]["params"]) == 2
    with pytest.raises(ConfigError, match="centroids_lr=0"):
        st.pq_param_groups(m, lr=0.1, centroids_lr=0)
