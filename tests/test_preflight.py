"""Model-dependent recipe errors surface right after the model is built, before any training."""
import importlib.util

import pytest

import slimtorch.pipeline as pipeline
from slimtorch.errors import ConfigError, PatternError, SlimtorchError
from slimtorch.recipe import parse_recipe

DOC = {"seed": 0, "data": {"name": "digits", "options": {"limit_train": 200, "limit_test": 100}},
       "model": {"name": "digits_mlp", "kwargs": {"hidden": 16}},
       "train": {"epochs": 1, "lr": 0.01, "batch_size": 32, "progress": False},
       "compress": {"method": "lsq+", "w_bits": 4, "a_bits": 4, "calibrate_batches": 2},
       "finetune": {"epochs": 1, "lr": 0.002, "batch_size": 32, "progress": False}}


def _doc(**sections):
    doc = {k: dict(v) if isinstance(v, dict) else v for k, v in DOC.items()}
    for sec, body in sections.items():
        doc[sec] = None if body is None else {**(doc.get(sec) or {}), **body}
    return doc


@pytest.mark.parametrize("sections,err,match", [
    ({"compress": {"include": ["conv*"]}}, PatternError, "'conv\\*' matches no layer"),
    ({"compress": {"exclude": "nothing*"}}, PatternError, "nothing"),
    ({"compress": {"plan": {"fc9": 4}}}, PatternError, "fc9"),
    ({"compress": {"calibrate_batches": 500}}, ConfigError, "calibrate_batches=500.*only 7 batches"),
    ({"search": {"method": "hawq", "bits": [4, 8], "budget": "avg_bits", "target": 3.0}}, ConfigError,
     r"search: budget avg_bits=3.0 is infeasible with bits \(4, 8\): the feasible range is \[4, 8\]"),
    ({"compress": {"method": "uhlich", "w_bits": 4, "a_bits": 4, "bit_set": [2, 4, 8],
                   "target_weight": 0.001, "target_unit": "kB"}}, ConfigError, "budget weight=0.001 kB is below"),
    ({"compress": {"method": "uhlich", "w_bits": 4, "a_bits": 4, "target_act_max": 1e-6,
                   "target_unit": "B"}}, ConfigError, "budget act_max=1e-06 B is below"),
    ({"prune": {"method": "magnitude", "include": "conv*"}}, PatternError, r"prune: pattern 'conv\*' matches no layer"),
    ({"prune": {"method": "hard_movement", "total_steps": 50}}, ConfigError,
     "prune: total_steps=50 but finetune runs 1 epochs x 7 batches = 7 steps"),
    ({"prune": {"method": "magnitude", "structure": "blocks", "block": [5, 5]}}, ConfigError,
     r"prune: layer 'fc1' \(blocks\).*whole number of blocks"),
])
def test_model_dependent_errors_come_before_training(tmp_path, monkeypatch, sections, err, match):
    def no_training(*a, **k):
        raise AssertionError("training started before the recipe was fully checked")
    monkeypatch.setattr(pipeline, "train", no_training)
    doc = _doc(**sections)
    if "search" in sections:
        doc["search"] = sections["search"]
    if sections.get("compress", {}).get("method") == "uhlich":
        doc["compress"] = {"calibrate_batches": 2, **sections["compress"]}
    with pytest.raises(err, match=match):
        pipeline.run_recipe(parse_recipe(doc), tmp_path, progress=False)
    assert not list(tmp_path.glob("*.ckpt"))


def test_missing_onnx_exporter_is_named_before_training(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxscript" else real(n, *a))
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ConfigError, match="onnxscript"):
        pipeline.run_recipe(parse_recipe(_doc(export={"onnx": "m.onnx"})), tmp_path, progress=False)


def test_preflight_leaves_the_rng_alone(tmp_path):
    """A recipe that passes gives the same bytes whether or not its checks drew random numbers."""
    a = pipeline.run_recipe(parse_recipe(DOC), tmp_path / "a", progress=False)
    import torch
    torch.manual_seed(123)   # a different global state before the run: the run seeds itself
    b = pipeline.run_recipe(parse_recipe(DOC), tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "model.slim").read_bytes() == (tmp_path / "b" / "model.slim").read_bytes()
    a.pop("timing"), b.pop("timing")
    assert a == b


def test_stale_temporaries_removed_on_start(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    stale = tmp_path / ".float.ckpt.tmp-999999999"
    stale.write_bytes(b"half a file")
    pipeline.run_recipe(parse_recipe(DOC), tmp_path, progress=False)
    assert not stale.exists()


def test_every_error_is_a_slimtorch_error():
    assert issubclass(PatternError, SlimtorchError) and issubclass(ConfigError, SlimtorchError)
