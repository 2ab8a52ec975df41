"""The generic trainer: config validation, learning, bit-exact resume, signals, distillation."""

import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.checkpoint import read_checkpoint
from slimtorch.errors import CheckpointError, ConfigError, DataError
from slimtorch.train import TrainConfig, distillation_loss, evaluate, train

N, D, C, BS = 256, 10, 3, 32


def make_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    w = torch.randn(D, C, generator=g)
    return x, (x @ w).argmax(1)


X, Y = make_data()


def batches(epoch, seed=0):
    """Order is a function of (seed, epoch) only; a list, so it has a length."""
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return [(X[perm[i:i + BS]], Y[perm[i:i + BS]]) for i in range(0, N, BS)]


def batches_gen(epoch):
    """The same batches from a generator: no length, so the schedule steps per epoch."""
    yield from batches(epoch)


def make_model(seed=0, dropout=0.3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, C))


def cfg(**kw):
    base = dict(epochs=2, lr=1e-2, progress=False, checkpoint_every=3, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("field, value", [
    ("lr", 0), ("lr", -1.0), ("epochs", -1), ("optimizer", "lion"), ("batch_size", 0),
    ("lr_schedule", "step"), ("grad_clip", 0.0), ("distill_alpha", 1.5), ("checkpoint_every", -2),
    ("epochs", 1.5),
])
def test_config_validation_names_field(field, value):
    with pytest.raises(ConfigError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_config_from_dict():
    assert TrainConfig.from_dict({"epochs": 3, "lr": 0.1}).epochs == 3
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    assert TrainConfig.from_dict(TrainConfig(seed=4).to_dict()) == TrainConfig(seed=4)


def test_training_reduces_loss_and_evaluate():
    model = make_model(dropout=0.0)
    before = evaluate(model, batches(0))
    hist = train(model, batches, cfg(epochs=6, checkpoint_every=0, progress=True),
                 evaluate_fn=lambda m: evaluate(m, batches(0)))
    after = evaluate(model, batches(0))
    assert before["n"] == after["n"] == N
    assert after["loss"] < 0.5 * before["loss"] and after["accuracy"] > 0.85
    assert len(hist["epochs"]) == 6 and hist["epochs"][-1]["accuracy"] == after["accuracy"]
    assert hist["epochs"][-1]["loss"] < hist["epochs"][0]["loss"]
    assert len(hist["steps"]) == 6 * (N // BS)
    assert hist["epochs"][-1]["lr"] < 1e-3  # cosine decayed to ~0
    # evaluate restores the mode it found
    model.train()
    evaluate(model, batches(0))
    assert model.training


def test_evaluate_matches_manual():
    model = make_model(dropout=0.5).eval()
    res = evaluate(model, batches(1))
    with torch.no_grad():
        out = model(X)
    assert res["n"] == N
    assert res["accuracy"] == pytest.approx((out.argmax(1) == Y).float().mean().item())
    assert res["loss"] == pytest.approx(F.cross_entropy(out, Y).item(), rel=1e-5)
    assert not model.training
    with pytest.raises(DataError, match="no batch"):
        evaluate(model, [])


def final_uninterrupted(tmp_path, data, **kw):
    model = make_model()
    hist = train(model, data, cfg(**kw), checkpoint_path=tmp_path / "a.st")
    return model.state_dict(), hist


def assert_bit_identical(sd_a, sd_b):
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k


@pytest.mark.parametrize("data, kw", [
    (batches, dict(optimizer="adam", lr_schedule="cosine")),
    (batches_gen, dict(optimizer="sgd", lr_schedule="cosine", grad_clip=1.0)),
])
def test_resume_after_exception_is_bit_exact(tmp_path, data, kw):
    sd_a, hist_a = final_uninterrupted(tmp_path, data, **kw)
    path = tmp_path / "b.st"

    def crash(model, step):
        if step == 11:  # epoch 1, step 3 of 8; last checkpoint at global step 9
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(make_model(), data, cfg(**kw), checkpoint_path=path, on_step=crash)
    st = read_checkpoint(path)["trainer_state"]
    assert (st["epoch"], st["step_in_epoch"], st["global_step"]) == (1, 1, 9)

    model = make_model(seed=123)  # different init: everything must come from the checkpoint
    hist_b = train(model, data, cfg(**kw), checkpoint_path=path, resume=True)
    assert_bit_identical(sd_a, model.state_dict())
    assert [e["loss"] for e in hist_b["epochs"]] == [e["loss"] for e in hist_a["epochs"]]


def test_sigint_saves_checkpoint_then_resume_is_bit_exact(tmp_path):
    sd_a, _ = final_uninterrupted(tmp_path, batches)
    path = tmp_path / "b.st"
    before = signal.getsignal(signal.SIGINT)
    seen = []

    def interrupt(model, step):
        seen.append(step)
        if step == 13:  # epoch 1, step 5: not a periodic checkpoint step
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="checkpoint saved"):
        train(make_model(), batches, cfg(), checkpoint_path=path, on_step=interrupt)
    assert seen == list(range(1, 14))  # the current step finished, no further step ran
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    assert path.exists()
    st = read_checkpoint(path)["trainer_state"]
    assert (st["epoch"], st["step_in_epoch"], st["global_step"]) == (1, 5, 13)

    model = make_model(seed=7)
    train(model, batches, cfg(), checkpoint_path=path, resume=True)
    assert_bit_identical(sd_a, model.state_dict())
    # resuming a finished run is a no-op that hands back the final weights
    again = make_model(seed=8)
    train(again, batches, cfg(), checkpoint_path=path, resume=True)
    assert_bit_identical(sd_a, again.state_dict())


def test_resume_without_checkpoint_starts_fresh_and_bad_file_fails(tmp_path):
    sd_a, _ = final_uninterrupted(tmp_path, batches)
    model = make_model()
    train(model, batches, cfg(), checkpoint_path=tmp_path / "new.st", resume=True)
    assert_bit_identical(sd_a, model.state_dict())
    bad = tmp_path / "bad.st"
    bad.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="not a slimtorch checkpoint"):
        train(make_model(), batches, cfg(), checkpoint_path=bad, resume=True)
    with pytest.raises(ConfigError, match="checkpoint_path"):
        train(make_model(), batches, cfg(), resume=True)


def test_empty_epoch_is_a_data_error():
    with pytest.raises(DataError, match=r"train_batches\(0\) yielded no batch"):
        train(make_model(), lambda epoch: [], cfg())
    with pytest.raises(DataError, match=r"\(x, y\) pairs"):
        train(make_model(), lambda epoch: [X[:4]], cfg())


def test_hooks_extra_loss_and_on_step():
    steps = []
    model = make_model(dropout=0.0)
    ref = make_model(dropout=0.0)
    hist = train(model, lambda e: batches(e)[:2], cfg(epochs=1, lr_schedule="constant"),
                 extra_loss=lambda m: torch.tensor(10.0), on_step=lambda m, s: steps.append(s))
    assert steps == [1, 2]
    with torch.no_grad():
        xb, yb = batches(0)[0]
        expected = F.cross_entropy(ref(xb), yb).item() + 10.0
    assert hist["steps"][0]["loss"] == pytest.approx(expected, rel=1e-6)
    assert hist["steps"][0]["lr"] == 1e-2


def test_distillation_loss_matches_hand_formula():
    student = make_model(seed=1, dropout=0.0)
    teacher = make_model(seed=2, dropout=0.0).train()
    ref = make_model(seed=1, dropout=0.0)
    xb, yb = batches(0)[0]
    alpha, T = 0.7, 3.0
    hist = train(student, lambda e: [(xb, yb)], cfg(epochs=1, distill_alpha=alpha, distill_temperature=T),
                 teacher=teacher)
    assert teacher.training  # teacher mode restored
    with torch.no_grad():
        s, t = ref(xb), teacher(xb)
        p_t = F.softmax(t / T, dim=1)
        kl = (p_t * (p_t.log() - F.log_softmax(s / T, dim=1))).sum(1).mean()
        expected = (1 - alpha) * F.cross_entropy(s, yb) + alpha * T * T * kl
        assert distillation_loss(s, t, yb, alpha, T).item() == pytest.approx(expected.item(), rel=1e-5)
    assert hist["steps"][0]["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert not torch.equal(student[0].weight, ref[0].weight)  # it trained


def test_resume_with_other_settings_is_refused_and_names_them(tmp_path, capsys):
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    batches = lambda epoch: [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]   # noqa: E731
    model = torch.nn.Linear(4, 2)
    ck = tmp_path / "t.ckpt"
    cfg = TrainConfig(epochs=2, lr=0.1, progress=False, checkpoint_every=1)

    def boom(m, step):
        if step == 6:
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        train(model, batches, cfg, checkpoint_path=ck, on_step=boom)
    with pytest.raises(ConfigError, match=r"lr=0\.1 \(now 0\.2\)"):
        train(model, batches, TrainConfig(epochs=2, lr=0.2, progress=False), checkpoint_path=ck, resume=True)
    train(model, batches, TrainConfig(epochs=2, lr=0.1, log_every=3), checkpoint_path=ck, resume=True)
    assert f"resuming from {ck} (epoch 1/2, step 1 of that epoch" in capsys.readouterr().err
