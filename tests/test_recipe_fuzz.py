"""Property-based: any mutation of a valid recipe is either accepted or refused with a slimtorch
error that names the section or key; nothing else escapes (no TypeError, KeyError, RecursionError)."""
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimtorch.errors import SlimtorchError
from slimtorch.recipe import parse_recipe

BASE = {"seed": 0, "data": {"name": "digits", "options": {"limit_train": 200, "limit_test": 100}},
        "model": {"name": "digits_mlp", "kwargs": {"hidden": 16}},
        "train": {"epochs": 1, "lr": 0.01, "batch_size": 32, "progress": False},
        "search": {"method": "hawq", "bits": [2, 4, 8], "budget": "avg_bits", "target": 4.0},
        "compress": {"method": "lsq+", "w_bits": 4, "a_bits": 4, "calibrate_batches": 2,
                     "include": ["fc*"], "tie_bits": False},
        "finetune": {"epochs": 1, "lr": 0.002, "batch_size": 32},
        "export": {"path": "model.slim", "onnx_kernels": "qdq"}}

KEYS = sorted({(s, k) for s, body in BASE.items() if isinstance(body, dict) for k in body}
              | {("compress", "plan"), ("compress", "exclude"), ("data", "eval_batch_size"),
                 ("export", "onnx"), ("compress", "integer_offset"), ("compress", "activations"),
                 ("search", "seed"), ("data", "options"), ("model", "checkpoint"), ("compress", "method"),
                 ("compress", "bogus_key"), ("train", "distill_alpha")})
leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=8),
                 st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, -1, 0, 1e308]))
hostile = st.recursive(leaf, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                    st.dictionaries(st.one_of(st.text(max_size=4), st.integers()),
                                                                    kids, max_size=3)), max_leaves=8)


def _copy(doc):
    return {k: dict(v) if isinstance(v, dict) else v for k, v in doc.items()}


def _check(doc, names):
    try:
        parse_recipe(doc)
    except SlimtorchError as e:
        assert any(n in str(e) for n in names), f"error does not name {names}: {e}"
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"raw {type(e).__name__} escaped for {doc}: {e}")


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(KEYS), hostile)
def test_mutated_value(where, value):
    section, key = where
    doc = _copy(BASE)
    doc[section] = {**doc[section], key: value}
    _check(doc, [section, key, "data.name", "model", "method"])


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(sorted(BASE) + ["bogus"]), hostile)
def test_mutated_section(section, value):
    doc = _copy(BASE)
    doc[section] = value
    _check(doc, [section, "recipe", "train", "compress", "model", "data"])


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(BASE)), st.integers(1, 60))
def test_deep_nesting(section, depth):
    value = 1
    for _ in range(depth):
        value = {"k": value} if depth % 2 else [value]
    doc = _copy(BASE)
    doc[section] = value
    _check(doc, [section, "recipe"])
