"""The recipe step ``ipq`` end to end (pipeline_ipq.py): the shipped digits recipe on a subset, stage
by stage, packed file size against the cost module, the file loads back to the same accuracy;
preflight refuses bad stages before training; steps per stage; pq_exact noise in the float training."""
from pathlib import Path

import pytest

import slimtorch as st
import slimtorch.pipeline as pipeline
from slimtorch.config import load_yaml
from slimtorch.data import load_dataset, make_loaders
from slimtorch.errors import ConfigError, PatternError
from slimtorch.pipeline_ipq import StepBatches
from slimtorch.recipe import parse_recipe
from slimtorch.train import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "digits-qn-ipq.yaml"
DATA = {"name": "digits", "options": {"limit_train": 192, "limit_test": 96}}


def _tiny(**over):
    doc = load_yaml(RECIPE)
    doc.update(data=DATA, train={**doc["train"], "epochs": 1, "progress": False})
    doc["ipq"]["finetune"] = {**doc["ipq"]["finetune"], "epochs": 1, "progress": False}
    doc.update(over)
    return doc


def test_shipped_recipe_runs_end_to_end_tiny(tmp_path):
    m = pipeline.run_recipe(parse_recipe(_tiny(), "digits-qn-ipq"), tmp_path, progress=False)
    stages = m["ipq"]["stages"]
    assert [s["layers"] for s in stages] == [["conv2"], ["fc1"], ["fc2"]]
    assert [s["n_centroids"] for s in stages] == [64, 256, 16] and all(s["steps"] == 3 for s in stages)
    assert m["quant_noise"]["stage"] == "train" and m["quant_noise"]["mode"] == "pq"
    kinds = {r["name"]: r["w_bits"] for r in m["layers"]}
    assert kinds["conv1"] in (None, 32) and m["compression"] > 10
    size, file = m["size_bytes"], m["export"]["file_bytes"]
    assert size <= file <= 1.02 * size + 4096                        # the cost module counts the file
    loaded = st.load_packed(tmp_path / "model.slim", lambda: pipeline.build_model("digits_cnn", num_classes=10))
    b = load_dataset("digits", **DATA["options"])
    _, test = make_loaders(b, batch_size=64, seed=0, test_batch_size=256)
    assert evaluate(loaded, test.batches(0))["accuracy"] == m["accuracy"]


def test_steps_per_stage_and_exact_noise_in_float_training(tmp_path):
    doc = _tiny(quant_noise={"mode": "pq_exact", "p": 1.0, "n_centroids": 16, "update_every": 2,
                             "exclude": "conv1"})
    doc["ipq"] = {"stages": ["fc*"], "n_centroids": 16, "steps": 4, "finetune": {"progress": False}}
    m = pipeline.run_recipe(parse_recipe(doc), tmp_path, progress=False)
    assert m["quant_noise"] == {"stage": "train", "mode": "pq_exact", "p": 1.0, "layers": ["conv2", "fc1", "fc2"]}
    assert [s["steps"] for s in m["ipq"]["stages"]] == [4] and m["ipq"]["stages"][0]["layers"] == ["fc1", "fc2"]


@pytest.mark.parametrize("ipq,err,match", [
    ({"stages": ["fc9"]}, PatternError, r"ipq: pattern 'fc9' matches no layer"),
    ({"stages": ["fc1", "fc1"]}, PatternError, r"ipq: include=\['fc1'\] exclude=\['fc1'\] leave no layer"),
    ({"block_size": 5}, ConfigError, r"ipq: layer 'conv1' .*block_size 5 does not divide"),
])
def test_preflight_refuses_bad_stages_before_training(tmp_path, ipq, err, match):
    with pytest.raises(err, match=match):
        pipeline.run_recipe(parse_recipe(_tiny(ipq=ipq)), tmp_path, progress=False)
    assert not (tmp_path / "float.ckpt").exists()


def test_preflight_refuses_layers_also_scalar_quantized(tmp_path):
    doc = _tiny(compress={"method": "lsq", "w_bits": 4, "a_bits": 8, "include": ["conv1", "fc2"],
                          "calibrate_batches": 1},
                finetune={"epochs": 1, "progress": False}, ipq={"stages": ["fc*"]})
    with pytest.raises(ConfigError, match=r"ipq: stage 0 \(\['fc\*'\]\): layer 'fc2' is also scalar-quantized"):
        pipeline.run_recipe(parse_recipe(doc), tmp_path, progress=False)


def test_step_batches_run_on_through_epochs():
    b = load_dataset("digits", limit_train=100, limit_test=10)
    tr, _ = make_loaders(b, batch_size=32, seed=0)
    assert len(tr) == 4 and len(StepBatches(tr, 10)) == 10
    got = list(StepBatches(tr, 10))
    want = list(tr.batches(0)) + list(tr.batches(1)) + list(tr.batches(2))[:2]
    assert len(got) == 10 and all((g[1] == w[1]).all() for g, w in zip(got, want))
