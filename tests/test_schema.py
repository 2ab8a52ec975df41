"""Strict field typing from annotations (pydantic strict mode): bool is not int, 'yes' is not bool."""
import math

import pytest

from slimtorch.config import config_from_dict
from slimtorch.errors import ConfigError
from slimtorch.schema import check_call, check_fields


@pytest.mark.parametrize("body,match", [
    ({"w_bits": True}, r"w_bits: input should be a valid integer, got True"),
    ({"w_bits": 4.0}, r"w_bits: input should be a valid integer"),
    ({"tie_bits": 5}, r"tie_bits: input should be a valid boolean, got 5"),
    ({"integer_offset": "yes"}, r"integer_offset: input should be a valid boolean"),
    ({"weights": 3}, r"weights: input should be a valid string"),
    ({"w_bits": 9}, r"w_bits=9 is out of range"),
    ({"zz": 1}, r"unknown key\(s\) \['zz'\]"),
])
def test_lsq_fields_strict(body, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"method": "lsq+", **body}, where="compress")


@pytest.mark.parametrize("body,match", [
    ({"target_act_max": math.inf}, "target_act_max: input should be a finite number"),
    ({"target_weight": math.nan}, "target_weight: input should be a finite number"),
    ({"lambdas": [1, "a", 2]}, r"lambdas\[1\]: input should be a valid number"),
    ({"bit_set": [2, True]}, r"bit_set\[1\]: input should be a valid integer"),
])
def test_uhlich_fields_strict(body, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"method": "uhlich", **body}, where="compress")


def test_hawq_fields_strict():
    with pytest.raises(ConfigError, match=r"seed: input should be a valid integer, got '1'"):
        config_from_dict({"method": "hawq", "seed": "1"}, where="search")
    with pytest.raises(ConfigError, match=r"seed=-1: expected an integer >= 0"):
        config_from_dict({"method": "hawq", "seed": -1}, where="search")
    cfg = config_from_dict({"method": "hawq", "bits": [8, 2, 4], "include": ["a*"]}, where="search")
    assert cfg.bits == (2, 4, 8) and cfg.include == ("a*",)


def test_lists_read_as_tuples_and_ints_as_floats():
    cfg = config_from_dict({"method": "uhlich", "lambdas": [1, 2, 3], "bit_set": [2, 4, 8]})
    assert cfg.lambdas == (1, 2, 3) and cfg.bit_set == (2, 4, 8)


def test_check_call_names_option_and_type():
    def loader(seed: int = 0, normalize: bool = True, frac: float = 0.2, anything=None):
        return None
    assert check_call(loader, {"seed": 3, "frac": 1, "anything": [1]}, "data.options")["frac"] == 1
    with pytest.raises(ConfigError, match=r"data.options.normalize: input should be a valid boolean, got 'no'"):
        check_call(loader, {"normalize": "no"}, "data.options")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) 'zz'"):
        check_call(loader, {"zz": 1}, "data.options")
    with pytest.raises(ConfigError, match="keys must be strings"):
        check_call(loader, {1: 2}, "data.options")


def test_check_fields_needs_a_mapping():
    from slimtorch.train import TrainConfig
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        check_fields(TrainConfig, [1, 2], "train")
