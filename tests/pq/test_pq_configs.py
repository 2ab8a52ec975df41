"""The PQ config (pq/configs.py): defaults, the method registry round trip, validation errors that
name the field, and the block size chosen per layer kind."""
import pytest
from torch import nn

import slimtorch as st
from slimtorch.config import config_from_dict, config_to_dict
from slimtorch.errors import ConfigError


def test_defaults_and_registry_round_trip():
    cfg = st.PQ()
    assert (cfg.n_centroids, cfg.block_size, cfg.n_iter, cfg.seed, cfg.int8_centroids) == (256, None, 20, 0, False)
    cfg = st.PQ(n_centroids=16, block_sizes={"linear": 4}, int8_centroids=True)
    d = config_to_dict(cfg)
    assert d["method"] == "pq" and config_from_dict(d) == cfg


@pytest.mark.parametrize("kwargs, match", [
    ({"n_centroids": 1}, "n_centroids=1"), ({"n_centroids": True}, "n_centroids=True"),
    ({"n_centroids": 70000}, "2..65536"), ({"block_size": 0}, "block_size=0"),
    ({"block_sizes": {"lstm": 4}}, r"unknown layer kind\(s\) \['lstm'\]"),
    ({"block_sizes": {"conv": 0}}, r"block_sizes\['conv'\]=0"), ({"n_iter": 0}, "n_iter=0"),
    ({"seed": -1}, "seed=-1"), ({"int8_centroids": 1}, "int8_centroids=1")])
def test_bad_values_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        st.PQ(**kwargs)


def test_strict_types_from_a_recipe():
    with pytest.raises(ConfigError, match="n_centroids"):
        config_from_dict({"method": "pq", "n_centroids": "256"})
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict({"method": "pq", "centroids": 256})


def test_block_size_per_layer_kind():
    lin, conv3, conv1 = nn.Linear(8, 2), nn.Conv2d(2, 2, 3), nn.Conv2d(8, 2, 1)
    assert [st.PQ().block_size_for(m) for m in (lin, conv3, conv1)] == [8, 9, 4]
    assert [st.PQ(block_sizes={"linear": 4, "conv": 18}).block_size_for(m) for m in (lin, conv3, conv1)] == [4, 18, 4]
    assert [st.PQ(block_size=2, block_sizes={"linear": 4}).block_size_for(m) for m in (lin, conv3, conv1)] == [2, 2, 2]
