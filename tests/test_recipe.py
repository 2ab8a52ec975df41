"""Recipe validation: every bad input fails early with a message naming the problem."""
import pytest

from slimtorch.errors import ConfigError
from slimtorch.quant import LSQPlus
from slimtorch.recipe import load_recipe, parse_recipe

BASE = {"seed": 1, "data": {"name": "digits"}, "model": {"name": "digits_mlp"},
        "train": {"epochs": 1, "lr": 0.01}, "compress": {"method": "lsq+", "w_bits": 4, "a_bits": 4,
                                                          "include": ["fc*"]},
        "finetune": {"epochs": 1}}


def _with(section, **kv):
    doc = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    doc[section] = {**doc.get(section, {}), **kv} if isinstance(doc.get(section), dict) else kv
    return doc


PRUNE = {"method": "hard_movement", "remaining": 0.25, "total_steps": 10, "warmup_steps": 2, "include": "fc*"}


def test_prune_section_builds_a_pruning_config():
    from slimtorch.prune import HardMovement
    r = parse_recipe({**BASE, "prune": PRUNE})
    assert isinstance(r.prune, HardMovement) and r.prune.remaining == 0.25 and r.prune.total_steps == 10
    assert r.prune_select == {"include": "fc*"}
    assert parse_recipe(BASE).prune is None


@pytest.mark.parametrize("prune,match", [
    ({**PRUNE, "remainig": 0.1}, r"prune \(hard_movement\): unknown key\(s\) \['remainig'\]"),
    ({**PRUNE, "remaining": 1.5}, r"prune.*remaining=1.5 is outside \(0, 1\]"),
    ({**PRUNE, "remaining": "0.1"}, r"prune \(hard_movement\).remaining"),
    ({**PRUNE, "warmup_steps": 5}, "warm-ups .* are longer than the run"),
    ({**PRUNE, "structure": "diagonal"}, "structure='diagonal'"),
    ({**PRUNE, "include": 3}, r"prune.include"),
    ({**PRUNE, "method": "lsq"}, "'lsq' is not a pruning method"),
    ({"remaining": 0.1}, "needs a 'method' key"),
])
def test_bad_prune_sections_fail_early(prune, match):
    with pytest.raises(ConfigError, match=match):
        parse_recipe({**BASE, "prune": prune})


def test_prune_needs_compress_and_finetune():
    with pytest.raises(ConfigError, match="'prune' section needs a 'compress' section"):
        parse_recipe({k: v for k, v in BASE.items() if k not in ("compress", "finetune")} | {"prune": PRUNE})
    with pytest.raises(ConfigError, match="total_steps=10 needs a 'finetune' section"):
        parse_recipe({k: v for k, v in BASE.items() if k != "finetune"} | {"prune": PRUNE})
    parse_recipe({k: v for k, v in BASE.items() if k != "finetune"} | {"prune": {"method": "magnitude"}})


def test_parse_builds_method_config():
    r = parse_recipe(BASE)
    assert isinstance(r.compress, LSQPlus) and r.compress.w_bits == 4
    assert r.select == {"include": ("fc*",)} and r.seed == 1


@pytest.mark.parametrize("doc,match", [
    ({**BASE, "trian": {}}, "trian"),
    (_with("data", batchsize=3), "batchsize"),
    (_with("model", nme="x"), "nme"),
    (_with("compress", wbits=4), "wbits"),
    (_with("compress", method="nope"), "nope"),
    (_with("compress", w_bits=9), "w_bits"),
    (_with("compress", a_bits=1), "a_bits"),
    (_with("train", lr=0), "lr"),
    (_with("finetune", lr=-1), "lr"),
    (_with("train", optimizer="adamx"), "optimizer"),
    ({k: v for k, v in BASE.items() if k != "data"}, "data"),
    ({**BASE, "train": None}, "checkpoint"),
    ({**BASE, "seed": "x"}, "seed"),
    ({**BASE, "export": {"onnx": "m.onnx", "onnx_kernels": "int8"}}, "onnx_kernels"),
    ({**BASE, "export": {"onnx": "m.onnx", "onnx_fuse_skip_layernorm": "false"}}, "onnx_fuse_skip_layernorm"),
])
def test_bad_recipes_name_the_problem(doc, match):
    with pytest.raises(ConfigError, match=match):
        parse_recipe(doc)


def test_load_recipe_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_recipe(bad)


def test_shipped_recipes_parse():
    from pathlib import Path
    recipes = sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.yaml"))
    assert recipes
    for p in recipes:
        load_recipe(p)


@pytest.mark.parametrize("doc,match", [
    ({**BASE, "data": 5}, "data: expected a mapping"),
    ({**BASE, "compress": [1]}, "compress: expected a mapping"),
    (_with("compress", include=5), "include"),
    (_with("compress", exclude=[None]), r"exclude"),
    (_with("compress", plan="abc"), "plan"),
    (_with("compress", plan={"fc1": 9}), r"plan\['fc1'\].w_bits"),
    (_with("compress", plan={"fc1": {"bits": 4}}), r"unknown key\(s\) \['bits'\]"),
    (_with("compress", tie_bits=5), "tie_bits: input should be a valid boolean"),
    (_with("compress", integer_offset="yes", activations="offset"), "integer_offset"),
    (_with("compress", calibrate_batches=float("nan")), "calibrate_batches"),
    (_with("compress", calibrate_batches=0), "calibrate_batches=0"),
    (_with("data", options={"normalize": "no"}), "normalize: input should be a valid boolean"),
    (_with("data", eval_batch_size=0), "eval_batch_size"),
    (_with("model", kwargs={"hidden": "32"}), r"model.kwargs.hidden"),
    ({**BASE, "export": {"onnx": True}}, "export.onnx: input should be a valid string"),
    ({**BASE, "export": {"path": "../escape.slim"}}, "inside the output folder"),
    ({**BASE, "search": {"method": "hawq", "seed": "1"}}, "search.*seed"),
    ({**BASE, "search": {"method": "hawq", "seed": -1}}, "seed=-1"),
    ({**BASE, 5: 1}, "keys must be strings"),
    ({**BASE, "seed": True}, "seed must be an integer"),
    ({**BASE, "compress": {"method": 5}}, "unknown method 5"),
    ({k: v for k, v in BASE.items() if k != "compress"}, "finetune.*needs a 'compress'"),
])
def test_hostile_values_are_refused_by_name(doc, match):
    with pytest.raises(ConfigError, match=match):
        parse_recipe(doc)


def test_duplicate_keys_in_a_recipe_file(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("data: {name: digits}\nmodel: {name: digits_mlp}\ntrain: {epochs: 1, lr: 0.1, lr: 0.2}\n")
    with pytest.raises(ConfigError, match=r"dup.yaml.*duplicate key 'lr'"):
        load_recipe(p)


def test_shipped_prune_recipe_parses():
    from pathlib import Path
    r = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "digits-prune-lsq-w4a4.yaml")
    assert type(r.prune).method == "hard_movement" and r.prune_select == {"exclude": "conv1"}
