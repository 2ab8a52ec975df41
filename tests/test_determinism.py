"""Same seed, same bytes: two runs of a recipe, and a run killed with SIGKILL then resumed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import slimtorch.pipeline as pipeline
from slimtorch.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).parents[1]
SMALL = {"seed": 0, "data": {"name": "digits", "options": {"limit_train": 600, "limit_test": 200}},
         "model": {"name": "digits_mlp", "kwargs": {"hidden": 32}},
         "train": {"epochs": 3, "lr": 0.01, "batch_size": 16, "checkpoint_every": 4},
         "compress": {"method": "lsq+", "w_bits": 4, "a_bits": 4, "calibrate_batches": 2},
         "finetune": {"epochs": 2, "lr": 0.002, "batch_size": 16, "checkpoint_every": 4}}


def _metrics(folder):
    m = json.loads((folder / "metrics.json").read_text())
    m.pop("timing")
    return m


@pytest.mark.slow
def test_default_recipe_twice_gives_identical_bytes(tmp_path):
    """The README's default job, twice in one process (the second starts from another RNG state)."""
    recipe = load_recipe(ROOT / "recipes" / "digits-lsqplus-w4a4.yaml")
    pipeline.run_recipe(recipe, tmp_path / "a", progress=False)
    pipeline.run_recipe(recipe, tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "model.slim").read_bytes() == (tmp_path / "b" / "model.slim").read_bytes()
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")


def _cli(recipe, out, *extra):
    return [sys.executable, "-m", "slimtorch.cli", "run", str(recipe), "--out", str(out), "--no-progress", *extra]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    recipe = tmp_path / "small.yaml"
    recipe.write_text(yaml.safe_dump(SMALL))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run(_cli(recipe, tmp_path / "ref"), check=True, env=env, capture_output=True)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cli(recipe, cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (cut / "finetune.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)     # no handler runs: whatever is on disk is what resume gets
    proc.wait()
    (cut / ".finetune.ckpt.tmp-999999999").write_bytes(b"left by a killed writer")
    res = subprocess.run(_cli(recipe, cut, "--resume"), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (cut / "model.slim").read_bytes() == (tmp_path / "ref" / "model.slim").read_bytes()
    assert _metrics(cut) == _metrics(tmp_path / "ref")
    assert not list(cut.glob(".*.tmp-*"))


def test_resume_refuses_a_damaged_checkpoint(tmp_path):
    doc = {**SMALL, "train": {**SMALL["train"], "epochs": 1, "progress": False}, "compress": None,
           "finetune": None}
    pipeline.run_recipe(parse_recipe(doc), tmp_path, progress=False)
    ck = tmp_path / "float.ckpt"
    data = bytearray(ck.read_bytes())
    data[-5] ^= 0xFF
    ck.write_bytes(bytes(data))
    from slimtorch.errors import CheckpointError
    with pytest.raises(CheckpointError, match=r"float.ckpt is corrupt: SHA-256 of its tensor data"):
        pipeline.run_recipe(parse_recipe(doc), tmp_path, resume=True, progress=False)
