"""QuantNoise config and the verbs: validation names the problem, block sizes that do not divide a
layer name the layer and the sizes that would, attach / remove leave the stored weights alone."""
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.attach import raw_weight, weight_transforms
from slimtorch.config import config_from_dict, config_to_dict, load_config, save_config
from slimtorch.pq import noise_transform, noisy_layers

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), True, "0.1"])
def test_p_outside_0_1_is_refused(p):
    with pytest.raises(st.ConfigError, match=r"p=.* outside \[0, 1\)"):
        st.QuantNoise(p=p)


@pytest.mark.parametrize("kw,match", [
    ({"mode": "int8"}, r"mode='int8'; expected one of \('pq', 'scalar', 'pq_exact'\)"),
    ({"mode": "scalar", "bits": 9}, r"bits=9; expected an integer in 2..8 or 'layer'"),
    ({"mode": "scalar", "bits": "4"}, r"bits='4'"),
    ({"block_size": 0}, r"block_size=0; expected an integer >= 1"),
    ({"mode": "scalar", "block_size": 8}, r"block_size=8 applies to modes 'pq' and 'pq_exact' only"),
    ({"embeddings": 1}, r"embeddings=1; expected true or false"),
])
def test_bad_fields_are_named(kw, match):
    with pytest.raises(st.ConfigError, match=match):
        st.QuantNoise(**kw)


def test_config_round_trips_through_dict_and_yaml(tmp_path):
    for cfg in (st.QuantNoise(p=0.2, block_size=4), st.QuantNoise(p=0.5, mode="scalar", bits="layer"),
                st.QuantNoise(p=0, mode="scalar", bits=4, embeddings=False)):
        assert config_from_dict(config_to_dict(cfg)) == cfg
        save_config(cfg, tmp_path / "qn.yaml")
        assert load_config(tmp_path / "qn.yaml") == cfg
    assert config_to_dict(st.QuantNoise())["method"] == "quant_noise"
    with pytest.raises(st.ConfigError, match=r"quant_noise\): unknown key\(s\) \['block'\]"):
        config_from_dict({"method": "quant_noise", "block": 8})


def test_block_size_that_does_not_divide_names_the_layer_and_the_divisors():
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    with pytest.raises(st.ConfigError, match=r"QuantNoise: layer '2' \(Linear, weight \[4, 12\]\): block_size 8 does not divide "
                                             r"its in_features 12; block sizes that would: \[1, 2, 3, 4, 6, 12\]"):
        st.quant_noise_(model, st.QuantNoise())
    assert not list(noisy_layers(model))                              # checked before anything is attached
    conv = nn.Sequential(nn.Conv2d(2, 4, 3))
    with pytest.raises(st.ConfigError, match=r"layer '0' \(Conv2d, weight \[4, 2, 3, 3\]\): block_size 4 does "
                                             r"not divide its in_channels/groups x kernel elements 18.*\[1, 2, 3, 6, 9, 18\]"):
        st.quant_noise_(conv, st.QuantNoise(block_size=4))
    st.quant_noise_(conv, st.QuantNoise(block_size=6))                 # any divisor of the row is a block
    assert noise_transform(conv[0]).block_size == 6


def test_selection_embeddings_and_already_noised():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Conv1d(8, 4, 1))
    st.quant_noise_(model, st.QuantNoise(embeddings=False), exclude="2")
    assert [n for n, *_ in noisy_layers(model)] == ["1"]
    with pytest.raises(st.ConfigError, match="layer '1' already has Quant-Noise"):
        st.quant_noise_(model, st.QuantNoise())
    st.quant_noise_(model, st.QuantNoise(p=0.2), include=["0", "2"])
    assert {n: t.block_size for n, _, t in noisy_layers(model)} == {"0": 8, "1": 8, "2": 4}
    with pytest.raises(st.PatternError, match="pattern 'nope' matches no layer"):
        st.quant_noise_(model, st.QuantNoise(), include="nope")
    with pytest.raises(st.ConfigError, match="expected a QuantNoise config"):
        st.quant_noise_(model, st.LSQ())


def test_remove_keeps_the_stored_weight_and_the_other_transforms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    params = [model[0].weight, model[2].weight]
    values = [p.detach().clone() for p in params]
    st.quantize_(model, st.LSQ(w_bits=4, a_bits=None), include="2")
    st.quant_noise_(model, st.QuantNoise(p=0.3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)                # holds the stored weights
    model(torch.randn(4, 16)).sum().backward()
    assert st.remove_quant_noise_(model) == ["0", "2"]
    assert not list(noisy_layers(model)) and len(weight_transforms(model[2])) == 1
    assert raw_weight(model[0]) is params[0] and raw_weight(model[2]) is params[1]   # same Parameters
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert any(p is params[0] for g in opt.param_groups for p in g["params"])
    assert st.remove_quant_noise_(model) == []


def test_attaching_draws_nothing():
    """torch runs a new parametrization chain once on registration: the noise stays quiet then, so
    attaching (noise, then a mask after it) leaves the random stream as it was."""
    model = nn.Sequential(nn.Linear(16, 8))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    st.quant_noise_(model, st.QuantNoise(p=0.5))
    st.prune_(model, st.Magnitude(remaining=0.5))
    assert torch.equal(torch.get_rng_state(), state) and noise_transform(model[0]).quiet is False
