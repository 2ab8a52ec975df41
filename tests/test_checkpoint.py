"""Checkpoint round trips, atomic writes and clear failures on bad files."""

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from slimtorch.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from slimtorch.errors import CheckpointError


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, w):
        return w * self.scale


class Net(nn.Module):
    def __init__(self, hidden=6):
        super().__init__()
        self.a = nn.Linear(4, hidden)
        self.bn = nn.BatchNorm1d(hidden)  # int64 num_batches_tracked
        self.b = nn.Linear(hidden, 3)
        self.c = nn.Linear(hidden, 3)
        self.c.weight = self.b.weight  # tied: shares storage
        parametrize.register_parametrization(self.a, "weight", Scale())
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("count", torch.tensor(7, dtype=torch.int32))  # 0-dim

    def forward(self, x):
        h = self.bn(self.a(x)).relu()
        return (self.b(h) + self.c(h)) * self.mask


def trained(seed=0, steps=3):
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(steps):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert type(a) is type(b) and a == b


def test_round_trip_model_optimizer_scheduler(tmp_path):
    model, opt, sched = trained()
    list(opt.state.values())[0]["my_count"] = 3  # a plain-number state entry
    state = {"epoch": 2, "history": [{"loss": 0.5}], "pair": (1, 2.5), "int_keys": {1: "x"},
             "best": float("inf"), "t": torch.arange(3)}
    path = save_checkpoint(tmp_path / "ck.st", model=model, optimizer=opt, scheduler=sched,
                           trainer_state=state, extra_tensors={"ema": torch.ones(2)})
    assert {p.name for p in tmp_path.iterdir()} == {"ck.st"}

    model2, opt2, sched2 = trained(seed=1, steps=1)
    got = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert_same(state, got)
    assert_same(model.state_dict(), model2.state_dict())
    assert_same(opt.state_dict(), opt2.state_dict())
    assert_same(sched.state_dict(), sched2.state_dict())
    step = list(opt2.state.values())[0]["step"]
    assert step.dim() == 0 and step.dtype == torch.float32 and step.item() == 3
    assert model2.c.weight is model2.b.weight  # tie kept
    assert torch.equal(read_checkpoint(path)["extra_tensors"]["ema"], torch.ones(2))
    x = torch.randn(5, 4)
    model.eval(), model2.eval()
    assert torch.equal(model(x), model2(x))


def test_file_is_plain_safetensors_with_documented_layout(tmp_path):
    model, opt, _ = trained()
    path = save_checkpoint(tmp_path / "ck.st", model=model, optimizer=opt, trainer_state={"epoch": 1})
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["slimtorch"])
    assert "model/a.parametrizations.weight.original" in keys
    assert "model/a.parametrizations.weight.0.scale" in keys
    assert "rng/torch" in keys and "optim/state/0/exp_avg" in keys and "optim/state/0/step" in keys
    assert meta["format"] == "slimtorch-checkpoint" and meta["version"] == 2
    assert meta["trainer_state"] == {"epoch": 1}


def test_rng_states_restored(tmp_path):
    model = nn.Linear(2, 2)
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    path = save_checkpoint(tmp_path / "ck.st", model=model)
    draws = (torch.rand(3), random.random(), np.random.rand(2))
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    load_checkpoint(path, model=model)
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(draws[0], again[0]) and draws[1] == again[1]
    assert np.array_equal(draws[2], again[2])
    torch.manual_seed(99)
    load_checkpoint(path, model=model, restore_rng=False)
    assert not torch.equal(torch.rand(3), draws[0])


def test_no_pickle_on_load(tmp_path, monkeypatch):
    model, opt, sched = trained()
    path = save_checkpoint(tmp_path / "ck.st", model=model, optimizer=opt, scheduler=sched)

    def boom(*a, **k):
        raise AssertionError("unpickling attempted")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, boom)
    model2, opt2, sched2 = trained(seed=1)
    load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    path = tmp_path / "ck.st"
    save_checkpoint(path, model=model, trainer_state={"v": 1})
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=model, trainer_state={"v": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ck.st"]  # no tmp left behind
    fresh = nn.Linear(3, 2)
    assert load_checkpoint(path, model=fresh) == {"v": 1}
    assert_same(old, fresh.state_dict())


def test_unstorable_state_fails_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match="trainer/fn"):
        save_checkpoint(tmp_path / "ck.st", model=nn.Linear(2, 2), trainer_state={"fn": object()})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match="does not exist"):
        save_checkpoint(tmp_path / "nodir" / "ck.st", model=nn.Linear(2, 2))


@pytest.mark.parametrize("kind, reason", [
    ("missing", "does not exist"),
    ("empty", "too short"),
    ("random", "not a safetensors file"),
    ("json_garbage", "not valid JSON"),
    ("plain", "without 'slimtorch' metadata"),
    ("other_format", "not a slimtorch checkpoint"),
    ("too_new", "newer than this slimtorch supports"),
    ("truncated", "truncated"),
    ("truncated_header", "truncated"),
])
def test_bad_files(tmp_path, kind, reason):
    path = tmp_path / "bad.st"
    good = tmp_path / "good.st"
    save_checkpoint(good, model=nn.Linear(8, 8), trainer_state={"epoch": 1})
    data = good.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "json_garbage":
        path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
    elif kind == "plain":
        save_file({"w": torch.zeros(2)}, str(path))
    elif kind == "other_format":
        save_file({"w": torch.zeros(2)}, str(path), metadata={"slimtorch": json.dumps({"format": "x"})})
    elif kind == "too_new":
        meta = {"format": "slimtorch-checkpoint", "version": 99}
        save_file({"w": torch.zeros(2)}, str(path), metadata={"slimtorch": json.dumps(meta)})
    elif kind == "truncated":
        path.write_bytes(data[: len(data) - 40])
    elif kind == "truncated_header":
        path.write_bytes(data[:30])
    with pytest.raises(CheckpointError, match=reason) as info:
        load_checkpoint(path, model=nn.Linear(8, 8))
    assert str(path) in str(info.value)


def test_model_mismatch_lists_keys_and_shapes(tmp_path):
    path = save_checkpoint(tmp_path / "ck.st", model=nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*0\.weight: checkpoint \(3, 4\) vs model \(5, 4\)"):
        load_checkpoint(path, model=nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2)))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model=nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2), nn.Linear(2, 2)))
    assert "missing keys" in str(info.value) and "2.weight" in str(info.value)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model=nn.Sequential(nn.Linear(4, 3)))
    assert "unexpected keys" in str(info.value) and "1.bias" in str(info.value)


def test_optimizer_state_missing_or_mismatched(tmp_path):
    model, opt, _ = trained()
    path = save_checkpoint(tmp_path / "ck.st", model=model)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(path, model=model, optimizer=opt)
    path = save_checkpoint(tmp_path / "ck2.st", model=model, optimizer=opt)
    other = torch.optim.Adam([{"params": [model.a.bias]}, {"params": [model.b.bias]}])
    with pytest.raises(CheckpointError, match="optimizer state does not fit"):
        load_checkpoint(path, model=model, optimizer=other)


def _data_start(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def test_every_data_byte_flip_is_refused(tmp_path):
    """SHA-256 of the data: a flipped byte anywhere in the tensors is refused, naming the path."""
    good = tmp_path / "good.st"
    model = Net()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    save_checkpoint(good, model=model, optimizer=opt, trainer_state={"epoch": 1})
    data = good.read_bytes()
    start = _data_start(data)
    for i, pos in enumerate(np.random.default_rng(0).integers(start, len(data), 24)):
        bad = bytearray(data)
        bad[pos] ^= 1 << (i % 8)
        path = tmp_path / f"flip{i}.st"
        path.write_bytes(bytes(bad))
        with pytest.raises(CheckpointError, match="SHA-256 of its tensor data") as info:
            read_checkpoint(path)
        assert str(path) in str(info.value)


def test_edited_metadata_with_valid_safetensors_is_refused(tmp_path):
    """A checkpoint rewritten by another tool with changed trainer state keeps its old digest: refused."""
    good = tmp_path / "good.st"
    save_checkpoint(good, model=nn.Linear(3, 3), trainer_state={"epoch": 1})
    with safe_open(str(good), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        md = dict(f.metadata())
    meta = json.loads(md["slimtorch"])
    meta["trainer_state"]["epoch"] = 7
    md["slimtorch"] = json.dumps(meta)
    path = tmp_path / "edited.st"
    save_file(tensors, str(path), metadata=md)
    with pytest.raises(CheckpointError, match="SHA-256 of its header"):
        read_checkpoint(path)


def test_version_1_files_still_load_with_a_warning(tmp_path):
    good = tmp_path / "good.st"
    save_checkpoint(good, model=nn.Linear(3, 3), trainer_state={"epoch": 1})
    with safe_open(str(good), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["slimtorch"])
    meta["version"] = 1
    old = tmp_path / "v1.st"
    save_file(tensors, str(old), metadata={"slimtorch": json.dumps(meta)})
    with pytest.warns(UserWarning, match="no checksum"):
        assert read_checkpoint(old)["trainer_state"] == {"epoch": 1}
