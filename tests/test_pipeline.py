"""End to end: run_recipe writes metrics/report/export; bad input fails early; resume is exact."""
import json
import os
import signal

import pytest

import slimtorch.pipeline as pipeline
from slimtorch.cli import main
from slimtorch.errors import CheckpointError, DataError, PatternError
from slimtorch.recipe import parse_recipe

DOC = {"seed": 0, "data": {"name": "digits", "options": {"limit_train": 400, "limit_test": 200}},
       "model": {"name": "digits_mlp", "kwargs": {"hidden": 32}},
       "train": {"epochs": 2, "lr": 0.01, "batch_size": 32, "progress": False, "checkpoint_every": 3},
       "compress": {"method": "lsq+", "w_bits": 4, "a_bits": 4, "calibrate_batches": 2},
       "finetune": {"epochs": 2, "lr": 0.002, "batch_size": 32, "progress": False, "checkpoint_every": 3},
       "export": {"path": "model.slim", "onnx": "model.onnx"}}


def test_run_recipe_writes_everything(tmp_path):
    m = pipeline.run_recipe(parse_recipe(DOC), tmp_path, progress=False)
    data = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("fp32_accuracy", "accuracy", "fp32_size_bytes", "size_bytes", "layers"):
        assert key in data
    assert data["size_bytes"] < data["fp32_size_bytes"] / 5     # 4-bit codes + per-channel steps + float biases
    assert all(r["w_bits"] == 4 and r["a_bits"] == 4 for r in data["layers"])  # first+last too
    assert data["accuracy"] > 0.6 and m["export"]["file_bytes"] > 0
    assert "| layer |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "model.onnx").stat().st_size > 0


def test_run_recipe_prunes_and_quantizes(tmp_path):
    """The prune step: masks before the quantizers, the schedule over the fine-tuning steps, the packed
    file storing masks + kept codes (smaller than the dense codes)."""
    import slimtorch as st
    doc = {**DOC, "export": {"path": "model.slim"},
           "prune": {"method": "hard_movement", "remaining": 0.2, "total_steps": 20, "warmup_steps": 2}}
    m = pipeline.run_recipe(parse_recipe(doc), tmp_path, progress=False)
    assert m["prune"]["sparsity"] == pytest.approx(0.8, abs=0.01) and m["prune"]["method"] == "hard_movement"
    assert m["prune"]["stored_bytes"] < m["size_bytes"]           # sparse layers: mask + kept codes
    loaded = st.load_packed(tmp_path / "model.slim", lambda: pipeline.build_model("digits_mlp", num_classes=10, hidden=32))
    assert st.sparsity(loaded)["weights"] == 0 and loaded.fc2.weight.count_nonzero() <= 0.2 * 32 * 32 + 1


def _sigint_in_finetune(monkeypatch, at_step: int):
    """Make the pipeline's second train() call (fine-tuning) receive SIGINT after step ``at_step``
    (its own on_step still runs); returns the real train to put back."""
    real_train = pipeline.train
    calls = {"n": 0}

    def interrupting_train(model, batches, cfg, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            inner = kw.get("on_step")

            def on_step(m, step):
                if inner is not None:
                    inner(m, step)
                if step == at_step:
                    os.kill(os.getpid(), signal.SIGINT)
            kw["on_step"] = on_step
        return real_train(model, batches, cfg, **kw)

    monkeypatch.setattr(pipeline, "train", interrupting_train)
    return real_train


def test_resume_after_interrupt_matches_uninterrupted(tmp_path, monkeypatch):
    ref = pipeline.run_recipe(parse_recipe(DOC), tmp_path / "ref", progress=False)
    real_train = _sigint_in_finetune(monkeypatch, 17)   # the middle of epoch 1 of fine-tuning
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_recipe(parse_recipe(DOC), tmp_path / "cut", progress=False)
    assert (tmp_path / "cut" / "finetune.ckpt").exists()
    monkeypatch.setattr(pipeline, "train", real_train)
    res = pipeline.run_recipe(parse_recipe(DOC), tmp_path / "cut", resume=True, progress=False)
    assert res["accuracy"] == ref["accuracy"] and res["fp32_accuracy"] == ref["fp32_accuracy"]
    from safetensors import safe_open
    files = [tmp_path / d / ref["export"]["path"].split("/")[-1] for d in ("ref", "cut")]
    tensors = []
    for f in files:
        with safe_open(str(f), "pt") as h:
            tensors.append({k: h.get_tensor(k) for k in h.keys()})
    assert tensors[0].keys() == tensors[1].keys()
    assert all((tensors[0][k] == tensors[1][k]).all() for k in tensors[0])


@pytest.mark.parametrize("change,err,match", [
    (("data", "name", "nosuchdata"), DataError, "nosuchdata"),
    (("model", "name", "nosuchmodel"), Exception, "nosuchmodel"),
    (("compress", "include", "conv*"), PatternError, "conv"),
    (("data", "options", {"limit_train": 0}), DataError, "digits"),
])
def test_bad_input_fails_early(tmp_path, change, err, match):
    doc = {k: dict(v) if isinstance(v, dict) else v for k, v in DOC.items()}
    sec, key, val = change
    doc[sec][key] = val
    with pytest.raises(err, match=match):
        pipeline.run_recipe(parse_recipe(doc), tmp_path, progress=False)


def test_float_checkpoint_that_is_not_one(tmp_path):
    bad = tmp_path / "w.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    doc = {**DOC, "model": {"name": "digits_mlp", "checkpoint": str(bad)}, "train": None}
    with pytest.raises(CheckpointError, match="w.ckpt"):
        pipeline.run_recipe(parse_recipe(doc), tmp_path / "o", progress=False)


def test_cli_reports_errors_with_exit_code(tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_text("data: {name: digits}\nmodel: {name: digits_mlp}\ntrain: {epochs: 1, lr: 0}\n")
    assert main(["run", str(r), "--out", str(tmp_path / "o")]) == 2
    assert "lr" in capsys.readouterr().err


def test_hawq_search_step_and_uhlich_method(tmp_path):
    doc = {**DOC, "search": {"method": "hawq", "bits": [2, 4, 8], "budget": "avg_bits", "target": 3.0,
                             "max_iter": 20, "num_batches": 2}}
    m = pipeline.run_recipe(parse_recipe(doc), tmp_path / "h", progress=False)
    w = [r["w_bits"] for r in m["layers"]]
    assert m["search"]["value"] <= 3.0 and set(w) <= {2, 4, 8}
    assert (tmp_path / "h" / "hawq.json").exists() and (tmp_path / "h" / "hawq_frontier.png").exists()
    doc = {**DOC, "compress": {"method": "uhlich", "w_bits": 4, "a_bits": 4, "bit_set": [2, 4, 8],
                               "target_weight": 12.0, "target_unit": "kB"}}
    m = pipeline.run_recipe(parse_recipe(doc), tmp_path / "u", progress=False)
    assert set(r["w_bits"] for r in m["layers"]) <= {2, 4, 8} and m["export"]["file_bytes"] > 0


def test_ebs_search_step(tmp_path):
    """search: {method: ebs}: the plan meets its BitOps target and is retrained; an infeasible target
    fails in preflight naming the feasible range."""
    from slimtorch.errors import ConfigError
    doc = {**DOC, "search": {"method": "ebs", "bits": [2, 4, 8], "a_bits": [2, 4, 8], "budget": "bitops",
                             "target_uniform": 3.0, "steps": 12, "warmup": 2, "calib_batches": 2}}
    m = pipeline.run_recipe(parse_recipe(doc), tmp_path / "e", progress=False)
    assert m["search"]["method"] == "ebs" and m["search"]["value"] <= m["search"]["target"]
    assert {r["w_bits"] for r in m["layers"]} <= {2, 4, 8} and {r["a_bits"] for r in m["layers"]} <= {2, 4, 8}
    saved = json.loads((tmp_path / "e" / "ebs.json").read_text())
    assert saved["plan"] == {r["name"]: {"w_bits": r["w_bits"], "a_bits": r["a_bits"]} for r in m["layers"]}
    doc["search"] = {**doc["search"], "target_uniform": None, "target": 10.0}
    with pytest.raises(ConfigError, match="feasible range"):
        pipeline.run_recipe(parse_recipe(doc), tmp_path / "bad", progress=False)


def test_search_without_compress_is_an_error():
    from slimtorch.errors import ConfigError
    doc = {k: v for k, v in DOC.items() if k != "compress"}
    doc["search"] = {"method": "hawq"}
    with pytest.raises(ConfigError, match="compress"):
        parse_recipe(doc)


def test_uhlich_resume_after_bits_froze_is_bit_identical(tmp_path, monkeypatch):
    """The freezing rule's counters and frozen bit sets travel in the checkpoint (extra_state)."""
    doc = {**DOC, "compress": {"method": "uhlich", "w_bits": 4, "a_bits": 4, "bit_set": [2, 4, 8],
                               "target_weight": 12.0, "target_unit": "kB", "freeze_after": 3},
           "export": {"path": "model.slim"}}
    pipeline.run_recipe(parse_recipe(doc), tmp_path / "ref", progress=False)
    real_train = _sigint_in_finetune(monkeypatch, 20)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_recipe(parse_recipe(doc), tmp_path / "cut", progress=False)
    from slimtorch.checkpoint import read_checkpoint
    saved = read_checkpoint(tmp_path / "cut" / "finetune.ckpt")["trainer_state"]["extra_state"]
    assert saved["budget"]["frozen_at"] is not None          # the interruption came after the freeze
    monkeypatch.setattr(pipeline, "train", real_train)
    pipeline.run_recipe(parse_recipe(doc), tmp_path / "cut", resume=True, progress=False)
    assert (tmp_path / "cut" / "model.slim").read_bytes() == (tmp_path / "ref" / "model.slim").read_bytes()


@pytest.mark.parametrize("fold", [True, False])
def test_fold_bn_and_reestimate_bn(tmp_path, fold):
    doc = {**DOC, "data": {"name": "synthetic", "options": {"n": 96, "shape": [3, 8, 8]}},
           "model": {"name": "bn_models:tiny_bn_cnn", "kwargs": {}},
           "train": {**DOC["train"], "epochs": 1}, "finetune": {**DOC["finetune"], "epochs": 1},
           "compress": {**DOC["compress"], "fold_bn": fold, "reestimate_bn": 2}, "export": {"path": "m.slim"}}
    m = pipeline.run_recipe(parse_recipe(doc), tmp_path, progress=False)
    if fold:      # every BN reads a conv output directly: all folded, none left to re-estimate
        assert len(m["fold_bn"]["folded"]) == 2 and not m["fold_bn"]["skipped"]
        assert "reestimate_bn" not in m or not m["reestimate_bn"]["layers"]
    else:
        assert "fold_bn" not in m and m["reestimate_bn"]["layers"] == ["1", "4"]
        assert m["reestimate_bn"]["batches"] == 2
    assert (tmp_path / "m.slim").stat().st_size > 0


def test_reestimate_bn_must_be_positive():
    doc = {**DOC, "compress": {**DOC["compress"], "reestimate_bn": 0}}
    with pytest.raises(Exception, match="reestimate_bn"):
        parse_recipe(doc)
    doc = {**DOC, "compress": {**DOC["compress"], "fold_bn": "yes"}}
    with pytest.raises(Exception, match="fold_bn"):
        parse_recipe(doc)
