"""Bad pruning input gets a clear ConfigError / PatternError naming the problem."""
import pytest
from torch import nn

import slimtorch as st
from slimtorch.config import config_from_dict, config_to_dict
from slimtorch.errors import ConfigError, PatternError


@pytest.mark.parametrize("remaining", [0, 0.0, -0.1, 1.5, float("nan")])
def test_remaining_outside_0_1(remaining):
    for cls in (st.Magnitude, st.HardMovement):
        with pytest.raises(ConfigError, match=r"remaining=.* is outside \(0, 1\]"):
            cls(remaining=remaining, total_steps=100)


def test_remaining_one_is_allowed():
    assert st.HardMovement(remaining=1.0, total_steps=10).remaining == 1.0


def test_warmups_longer_than_the_run():
    with pytest.raises(ConfigError, match=r"warm-ups .* = 300 steps\) are longer than the run \(total_steps=200\)"):
        st.HardMovement(total_steps=200, warmup_steps=100)            # (1 + 2) x 100 > 200
    with pytest.raises(ConfigError, match="longer than the run"):
        st.SoftMovement(total_steps=10, warmup_steps=4, initial_warmup=2, final_warmup=1)
    st.HardMovement(total_steps=300, warmup_steps=100)                # exactly the run: allowed


@pytest.mark.parametrize("kwargs, match", [
    (dict(scope="blocks"), "scope='blocks'"),
    (dict(global_every=0), "global_every=0"),
    (dict(scores_lr=0), "scores_lr=0"),
    (dict(min_keep=0.001), r"min_keep=0.001.*0.5%"),
    (dict(total_steps=0), "movement pruning learns its scores"),
    (dict(total_steps=-5), "total_steps=-5"),
    (dict(warmup_steps=1.5), "warmup_steps=1.5"),
    (dict(initial_warmup=-1), "initial_warmup=-1"),
])
def test_hard_movement_fields(kwargs, match):
    args = {"total_steps": 100, **kwargs}
    with pytest.raises(ConfigError, match=match):
        st.HardMovement(**args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tau=0), "tau=0"), (dict(tau=1.0), "tau=1.0"), (dict(initial_tau=0.5), "initial_tau=0.5"),
    (dict(lam=-1), "lam=-1"),
])
def test_soft_movement_fields(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        st.SoftMovement(total_steps=100, **kwargs)


def test_magnitude_one_shot_needs_no_steps():
    assert st.Magnitude(remaining=0.5).total_steps == 0


def test_round_trip_and_unknown_key():
    cfg = st.HardMovement(remaining=0.03, total_steps=500, warmup_steps=50, scope="global")
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_to_dict(st.SoftMovement(total_steps=5))["method"] == "soft_movement"
    with pytest.raises(ConfigError, match="remainig"):
        config_from_dict({"method": "magnitude", "remainig": 0.1})
    with pytest.raises(ConfigError, match="remaining"):
        config_from_dict({"method": "magnitude", "remaining": "10%"})


def _mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_pattern_errors():
    with pytest.raises(PatternError, match=r"pattern 'enc\.\*' matches no layer"):
        st.prune_(_mlp(), st.Magnitude(remaining=0.5), include="enc.*")
    emb = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(PatternError, match=r"no prunable layer \(Conv1d, Conv2d, Linear\)"):  # embeddings are not pruned by default
        st.prune_(emb, st.Magnitude(remaining=0.5))
    st.prune_(emb, st.Magnitude(remaining=0.5, embeddings=True))
    assert st.sparsity(emb)["sparsity"] == pytest.approx(0.5)


def test_prune_twice_and_wrong_config():
    m = _mlp()
    st.prune_(m, st.Magnitude(remaining=0.5))
    with pytest.raises(ConfigError, match="already pruned"):
        st.prune_(m, st.Magnitude(remaining=0.5), include="0")
    with pytest.raises(ConfigError, match="expected a pruning config"):
        st.prune_(_mlp(), st.LSQ())


def test_soft_movement_warns_when_its_scores_cannot_reach_tau():
    """logit(0.1) = -2.20: 100 Adam steps at 1e-2 move a score at most ~1.0, so nothing could be pruned."""
    import warnings
    from torch import nn
    with pytest.warns(UserWarning, match=r"logit\(tau=0.1\) = -2.20.*at most ~1.00 in total_steps=100.*>= 0.022"):
        st.prune_(nn.Sequential(nn.Linear(4, 4)), st.SoftMovement(total_steps=100))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st.prune_(nn.Sequential(nn.Linear(4, 4)), st.SoftMovement(total_steps=100, scores_lr=0.05))
