"""The recipe step ``quant_noise``: validated with the other sections (unknown keys named), attached
for one training stage and removed after it; preflight catches bad block sizes before training."""
import pytest
import torch

import slimtorch as st
import slimtorch.pipeline as pipeline
from slimtorch.config import config_to_dict
from slimtorch.errors import ConfigError
from slimtorch.recipe import parse_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

DOC = {"seed": 0, "data": {"name": "digits", "options": {"limit_train": 128, "limit_test": 64}},
       "model": {"name": "digits_mlp", "kwargs": {"hidden": 16}},
       "train": {"epochs": 1, "lr": 0.01, "batch_size": 32, "progress": False},
       "export": {"path": "model.slim"}}
COMPRESS = {"compress": {"method": "lsq", "w_bits": 4, "a_bits": 8, "calibrate_batches": 1},
            "finetune": {"epochs": 1, "lr": 0.002, "batch_size": 32, "progress": False}}


def test_section_builds_the_config_and_resolves_the_stage():
    r = parse_recipe({**DOC, "quant_noise": {"p": 0.2, "include": "fc*"}})
    assert r.quant_noise == st.QuantNoise(p=0.2) and r.noise_select == {"include": "fc*", "stage": "train"}
    r = parse_recipe({**DOC, **COMPRESS, "model": {**DOC["model"], "checkpoint": "float.ckpt"}, "train": None,
                      "quant_noise": {"method": "quant_noise", "mode": "scalar", "bits": "layer", "p": 0.5}})
    assert r.noise_select == {"stage": "finetune"} and r.quant_noise.bits == "layer"
    again = parse_recipe({**DOC, "quant_noise": config_to_dict(st.QuantNoise(p=0.1, block_size=4))})
    assert again.quant_noise == st.QuantNoise(p=0.1, block_size=4)          # round trip through the dict
    assert parse_recipe(DOC).quant_noise is None


@pytest.mark.parametrize("section,match", [
    ({"p": 0.1, "blok_size": 8}, r"quant_noise \(quant_noise\): unknown key\(s\) \['blok_size'\]"),
    ({"p": 1.0}, r"quant_noise \(quant_noise\): QuantNoise: p=1.0 outside \[0, 1\)"),
    ({"p": "0.1"}, r"quant_noise \(quant_noise\).p"),
    ({"stage": "eval"}, r"quant_noise.stage"),
    ({"method": "magnitude"}, r"method 'magnitude'; this section takes method quant_noise only"),
    ({"stage": "finetune"}, r"stage 'finetune' needs a 'finetune' section"),
    ({"mode": "scalar", "bits": "layer"}, r"bits='layer' reads the layers' weight quantizers"),
    ([0.1], r"quant_noise: expected a mapping"),
])
def test_bad_sections_fail_early(section, match):
    with pytest.raises(ConfigError, match=match):
        parse_recipe({**DOC, "quant_noise": section})


def test_stage_train_needs_a_float_training():
    doc = {**DOC, **COMPRESS, "train": None, "model": {**DOC["model"], "checkpoint": "f.ckpt"},
           "quant_noise": {"stage": "train"}}
    with pytest.raises(ConfigError, match="stage 'train' needs a 'train' section that runs"):
        parse_recipe(doc)


def test_run_with_noise_in_float_training_then_export(tmp_path):
    """Noise during the float training only: removed before evaluation and export; the float file
    loads back to the same outputs."""
    m = pipeline.run_recipe(parse_recipe({**DOC, "quant_noise": {"p": 0.1}}), tmp_path, progress=False)
    assert m["quant_noise"] == {"stage": "train", "mode": "pq", "p": 0.1, "layers": ["fc1", "fc2", "fc3"]}
    assert m["accuracy"] == m["fp32_accuracy"]                         # float model, noise gone
    loaded = st.load_packed(tmp_path / "model.slim",
                            lambda: pipeline.build_model("digits_mlp", num_classes=10, hidden=16))
    assert not any(n.endswith("parametrizations") for n, _ in loaded.named_modules())


def test_run_with_scalar_noise_at_the_layers_bits_in_finetuning(tmp_path):
    doc = {**DOC, **COMPRESS, "quant_noise": {"mode": "scalar", "p": 0.5, "bits": "layer", "stage": "finetune"}}
    m = pipeline.run_recipe(parse_recipe(doc), tmp_path, progress=False)
    assert m["quant_noise"]["stage"] == "finetune" and len(m["quant_noise"]["layers"]) == 3
    assert m["export"]["file_bytes"] > 0


def test_preflight_refuses_a_block_size_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"quant_noise: QuantNoise: layer 'fc1' .*block_size 5 does "
                                          r"not divide its in_features 64; block sizes that would: \[1, 2, 4, 8, 16, 32, 64\]"):
        pipeline.run_recipe(parse_recipe({**DOC, "quant_noise": {"block_size": 5}}), tmp_path, progress=False)
    assert not (tmp_path / "float.ckpt").exists()

