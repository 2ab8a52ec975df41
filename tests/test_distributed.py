"""slimtorch under torch.distributed (gloo, 2 CPU processes): the same result as one process with the
same global batch; calibration over ranks equals calibration on the concatenated data; disagreeing
ranks get a clear error; plans are computed once and broadcast; launcher input is checked."""
import json

import pytest
import torch
import torch.multiprocessing as mp

import dist_workers as W
from slimtorch import distributed as D
from slimtorch.errors import ConfigError

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")


def _run(tmp_path, job, world):
    if world == 1:
        W.run_job(0, 1, str(tmp_path), job)
    else:
        try:
            mp.spawn(W.run_job, args=(world, str(tmp_path), job), nprocs=world, join=True)
        except mp.ProcessExitedException:
            # gloo's teardown aborts a process now and then ("terminate called without an active
            # exception"), also before this project's changes; a rank that wrote its result had finished
            if not all((tmp_path / f"out-{job}-{world}-{r}.json").exists() for r in range(world)):
                raise
    out = [json.loads((tmp_path / f"out-{job}-{world}-{r}.json").read_text()) for r in range(world)]
    for o in out:
        assert "error" not in o, o.get("trace")
    return out


def _close(a, b, tol):
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    assert ta.shape == tb.shape
    assert torch.allclose(ta, tb, rtol=tol, atol=tol), (ta - tb).abs().max()


def test_two_ranks_train_like_one_process_with_the_same_global_batch(tmp_path):
    one = _run(tmp_path, "train", 1)[0]["state"]
    two = _run(tmp_path, "train", 2)
    assert two[0]["state"].keys() == one.keys()
    for k in one:
        _close(two[0]["state"][k], two[1]["state"][k], 0.0)        # ranks identical
        _close(two[0]["state"][k], one[k], 1e-6)                    # = one process


def test_calibration_over_ranks_equals_calibration_on_all_data(tmp_path):
    one = _run(tmp_path, "calibrate", 1)[0]
    two = _run(tmp_path, "calibrate", 2)
    assert two[0] == two[1]
    for layer, v in one["minmax"].items():
        _close(two[0]["minmax"][layer], v, 1e-7)                     # exact up to float rounding
    for layer, v in one["bias"].items():
        _close(two[0]["bias"][layer], v, 1e-6)                       # bias correction sums reduced
    for init in ("mse_hist", "percentile"):                           # merged histograms: bin-level
        for layer, v in one[init].items():
            _close(two[0][init][layer], v, 2e-2)


def test_model_input_channel_ranges_over_ranks(tmp_path):
    one = _run(tmp_path, "model_input", 1)[0]
    two = _run(tmp_path, "model_input", 2)
    assert two[0] == two[1] and len(one["minmax"]) == 6
    _close(two[0]["minmax"], one["minmax"], 1e-7)             # min of minima, max of maxima: exact
    _close(two[0]["mse_hist"], one["mse_hist"], 2e-2)         # MSE on the same values, other order


def test_bn_reestimation_over_ranks_equals_one_process_over_all_batches(tmp_path):
    one = _run(tmp_path, "bn", 1)[0]
    two = _run(tmp_path, "bn", 2)
    assert two[0] == two[1] and two[0]["n"] == one["n"] == 6
    _close(two[0]["mean"], one["mean"], 1e-6)
    _close(two[0]["var"], one["var"], 1e-6)


def test_adaround_learned_once_and_broadcast(tmp_path):
    one = _run(tmp_path, "adaround", 1)[0]          # rank 0's data alone
    two = _run(tmp_path, "adaround", 2)
    assert two[0] == two[1] and two[0]["layers"] == one["layers"] == ["0", "2"]
    for k in one["state"]:
        _close(two[0]["state"][k], one["state"][k], 1e-6)


def test_gptq_rounded_once_and_broadcast(tmp_path):
    one = _run(tmp_path, "gptq", 1)[0]              # rank 0's data alone
    two = _run(tmp_path, "gptq", 2)
    assert two[0] == two[1] and two[0]["layers"] == one["layers"] == ["0", "2"]
    for k in one["state"]:
        _close(two[0]["state"][k], one["state"][k], 1e-6)


def test_gptq_in_calibrate_keeps_ranks_in_step_when_rank_0_adds_a_bias(tmp_path):
    two = _run(tmp_path, "gptq_bias", 2)
    assert two[0] == two[1] and two[0]["bias0"]


def test_ranks_that_disagree_on_the_plan_get_an_error_naming_them(tmp_path):
    out = _run(tmp_path, "disagree", 2)
    for o in out:
        assert o["raised"] and "differs between ranks" in o["raised"] and "[[0], [1]]" in o["raised"]


def test_ebs_plan_is_computed_once_and_broadcast(tmp_path):
    out = _run(tmp_path, "ebs", 2)
    assert out[0] == out[1]
    assert out[0]["plan"] == _run(tmp_path, "ebs", 1)[0]["plan"]


def test_single_process_helpers_and_launch_errors():
    assert not D.active() and D.rank() == 0 and D.world_size() == 1
    assert D.broadcast_object({"a": 1}) == {"a": 1} and D.all_gather_object(3) == [3]
    D.check_same({"x": 1}, "anything")                                # one process: nothing to compare
    x, y = torch.arange(8).reshape(4, 2), torch.arange(4)
    xs, ys = D.shard((x, y), r=1, w=2)
    assert torch.equal(xs, x[2:]) and torch.equal(ys, y[2:])
    with pytest.raises(ConfigError, match="does not split evenly"):
        D.shard((x, y), r=0, w=3)
    with pytest.raises(ConfigError, match="more than the"):
        D.check_launch(10_000, "gloo")
    with pytest.raises(ConfigError, match="does not exist"):
        D.check_launch(2, "mpi2")
    with pytest.raises(ConfigError, match="GPUs"):
        if not torch.cuda.is_available():
            D.check_launch(2, "nccl")
        else:
            D.check_launch(torch.cuda.device_count() + 1, "nccl")


RECIPE = """seed: 0
data: {name: digits, options: {limit_train: 384, limit_test: 200}}
model: {name: digits_mlp, kwargs: {hidden: 32}}
train: {epochs: EPOCHS, lr: 0.01, batch_size: 32, progress: false, checkpoint_every: 2}
compress: {method: lsq+, w_bits: 4, a_bits: 4, calibrate_batches: 2}
finetune: {epochs: 2, lr: 0.002, batch_size: 32, progress: false, checkpoint_every: 2}
export: {path: model.slim}
"""


def _cli(args, **kw):
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "slimtorch.cli", "run", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _children(pid):
    import os
    kids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                stat = open(f"/proc/{p}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(p))
    return kids


@pytest.mark.skipif(not __import__("os").path.isdir("/proc"), reason="needs /proc to find the workers")
def test_cli_nproc_2_killed_worker_resumes_bit_identical(tmp_path):
    """slimtorch run --nproc 2: kill -9 of one worker mid-training, then --resume, gives the same packed
    file (byte for byte) as an uninterrupted run with 2 workers."""
    import os
    import signal
    import time
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("EPOCHS", "8"))
    ref = _cli([str(recipe), "--out", str(tmp_path / "ref"), "--nproc", "2", "--no-progress"])
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    run = _cli([str(recipe), "--out", str(tmp_path / "cut"), "--nproc", "2", "--no-progress"])
    ckpt, t0 = tmp_path / "cut" / "float.ckpt", time.time()
    while not ckpt.exists() and run.poll() is None and time.time() - t0 < 120:
        time.sleep(0.02)
    workers = [k for c in _children(run.pid) for k in [c] + _children(c)]
    workers = [w for w in workers if "slimtorch.cli" in open(f"/proc/{w}/cmdline").read().replace("\0", " ")]
    assert workers and run.poll() is None, "the run ended before a worker could be killed"
    os.kill(workers[-1], signal.SIGKILL)
    _, err = run.communicate(timeout=300)
    assert run.returncode != 0 and "--resume" in err
    assert not (tmp_path / "cut" / "model.slim").exists()
    res = _cli([str(recipe), "--out", str(tmp_path / "cut"), "--nproc", "2", "--resume", "--no-progress"])
    _, err = res.communicate(timeout=300)
    assert res.returncode == 0, err
    assert (tmp_path / "cut" / "model.slim").read_bytes() == (tmp_path / "ref" / "model.slim").read_bytes()
    m_ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    m_cut = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert m_cut["accuracy"] == m_ref["accuracy"] and m_cut["fp32_accuracy"] == m_ref["fp32_accuracy"]


def test_cli_nproc_errors_before_starting_workers(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("EPOCHS", "1").replace("batch_size: 32, progress: false, checkpoint_every: 2}\ncompress",
                                                           "batch_size: 31, progress: false}\ncompress"))
    for args, msg in (([ "--nproc", "2"], "does not divide by the world size"),
                      (["--nproc", "4096"], "more than the"),
                      (["--nproc", "2", "--backend", "mpi9"], "does not exist")):
        p = _cli([str(recipe), "--out", str(tmp_path / "o"), *args])
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2 and msg in err, err
