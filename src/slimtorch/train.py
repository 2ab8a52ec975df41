"""A small, generic trainer: one user of the library verbs, with checkpoint/resume and distillation.

It knows nothing about quantization: compression hooks come in through ``extra_loss(model)``
(budget penalties, L1 on scores ...) and ``on_step(model, global_step)`` (schedules, refreshes).
Users with their own loop never need this module.
"""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimtorch import distributed as D
from slimtorch.checkpoint import apply_checkpoint, read_checkpoint, restore_rng, save_checkpoint
from slimtorch.distill import distill_loss
from slimtorch.errors import ConfigError, DataError

__all__ = ["TrainConfig", "train", "evaluate", "distillation_loss", "seed_everything"]

OPTIMIZERS = ("adam", "adamw", "sgd")
MAX_LR = 1e3   # larger learning rates / decays overflow float32 optimizer state: a typo, not a setting
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train`. ``batch_size`` is read by the data side (it builds the batches).

    ``checkpoint_every``: save every N optimizer steps (0: only at the end of each epoch).
    ``log_every``: record loss/lr in ``history["steps"]`` and the progress bar every N steps.
    ``distill_alpha``/``distill_temperature``: used when ``train(teacher=...)`` is given; the loss is
    ``(1 - alpha) * CE + alpha * T^2 * KL(teacher || student)``.
    """

    epochs: int = 1
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    seed: int = 0
    lr_schedule: str = "cosine"
    checkpoint_every: int = 200
    log_every: int = 10
    progress: bool = True
    grad_clip: float | None = None
    distill_alpha: float = 0.5
    distill_temperature: float = 4.0

    def __post_init__(self):
        def need(field, ok, what):
            if not ok:
                raise ConfigError(f"TrainConfig.{field} must be {what}, got {getattr(self, field)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need("epochs", is_int(self.epochs) and self.epochs >= 0, "an integer >= 0")
        need("lr", is_num(self.lr) and 0 < self.lr <= MAX_LR, f"a number in (0, {MAX_LR:g}]")
        need("optimizer", self.optimizer in OPTIMIZERS, f"one of {OPTIMIZERS}")
        need("momentum", is_num(self.momentum) and 0 <= self.momentum < 1, "a number in [0, 1)")
        need("weight_decay", is_num(self.weight_decay) and 0 <= self.weight_decay <= MAX_LR,
             f"a number in [0, {MAX_LR:g}]")
        need("batch_size", is_int(self.batch_size) and self.batch_size >= 1, "an integer >= 1")
        need("seed", is_int(self.seed) and self.seed >= 0, "an integer >= 0")
        need("lr_schedule", self.lr_schedule in SCHEDULES, f"one of {SCHEDULES}")
        need("checkpoint_every", is_int(self.checkpoint_every) and self.checkpoint_every >= 0,
             "an integer >= 0 (0: only at epoch ends)")
        need("log_every", is_int(self.log_every) and self.log_every >= 1, "an integer >= 1")
        need("progress", isinstance(self.progress, bool), "True or False")
        need("grad_clip", self.grad_clip is None or (is_num(self.grad_clip) and self.grad_clip > 0),
             "None or a number > 0")
        need("distill_alpha", is_num(self.distill_alpha) and 0 <= self.distill_alpha <= 1,
             "a number in [0, 1]")
        need("distill_temperature", is_num(self.distill_temperature) and 0 < self.distill_temperature <= 1e3,
             "a number in (0, 1000]")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a plain dict (a recipe section); unknown keys raise ConfigError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown TrainConfig key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's ``random`` and numpy's global RNG."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _device(module: torch.nn.Module) -> torch.device:
    t = next(iter(module.parameters()), None)
    t = t if t is not None else next(iter(module.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _logits(model: torch.nn.Module, x: Any) -> torch.Tensor:
    out = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):  # HF ModelOutput
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise DataError(f"the model returned {type(out).__name__}; expected logits (a tensor)")


def _unpack(batch: Any, source: str) -> tuple:
    try:
        x, y = batch
    except (TypeError, ValueError):
        raise DataError(f"{source} must yield (x, y) pairs, got "
                        f"{type(batch).__name__}") from None
    return x, y


def distillation_loss(student_logits, teacher_logits, targets, alpha: float, temperature: float):
    """``(1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))`` (batchmean):
    :func:`slimtorch.distill.distill_loss` with the trainer's argument order."""
    return distill_loss(student_logits, teacher_logits, T=temperature, alpha=alpha, labels=targets)


def _make_optimizer(model, config: TrainConfig, param_groups):
    params = param_groups if param_groups is not None else \
        [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (and no param_groups were given)")
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def _make_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int | None):
    """Cosine over all steps when batches have a length, else stepped once per epoch."""
    if config.lr_schedule == "constant":
        return None
    t_max = config.epochs * steps_per_epoch if steps_per_epoch else config.epochs
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, t_max))


class _StopOnSignal:
    """SIGINT/SIGTERM set ``stop``; the trainer finishes the step, saves, then raises.
    A second signal raises KeyboardInterrupt at once. Main thread only; restores old handlers."""

    def __init__(self):
        self.stop = 0
        self._prev = {}

    def _handle(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt(f"second signal {signum}: stopping now")
        self.stop = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
                if s is not None:
                    self._prev[s] = signal.getsignal(s)
                    signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._prev.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


_NO_EFFECT = ("progress", "checkpoint_every", "log_every")   # settings that do not change the result


def _check_resume_config(ckpt: dict, config: TrainConfig, path) -> None:
    """Refuse to resume a checkpoint written with other training settings; say which one resumes."""
    st = ckpt["trainer_state"]
    saved = st.get("config") if isinstance(st, dict) else None
    if isinstance(saved, dict):
        now = config.to_dict()
        diff = sorted(k for k in now if k not in _NO_EFFECT and k in saved and saved[k] != now[k])
        if diff:
            raise ConfigError(f"cannot resume from {path}: it was written with other training settings "
                              + ", ".join(f"{k}={saved[k]!r} (now {now[k]!r})" for k in diff)
                              + "; use a new output folder or the original settings")
    # always said, progress bars or not: which file a resumed run continues from
    print(f"resuming from {path} (epoch {st.get('epoch', 0)}/{config.epochs}, step "
          f"{st.get('step_in_epoch', 0)} of that epoch; "
          f"{'SHA-256 verified' if ckpt['version'] >= 2 else 'format v1, no checksum'})", file=sys.stderr)


# --------------------------------------------------------------------------- train / evaluate
def train(model: torch.nn.Module, train_batches: Callable[[int], Iterable], config: TrainConfig, *,
          extra_loss: Callable | None = None, on_step: Callable | None = None,
          checkpoint_path=None, resume: bool = False, teacher: torch.nn.Module | None = None,
          evaluate_fn: Callable | None = None, param_groups=None, extra_state=None) -> dict:
    """Train ``model`` on ``train_batches(epoch)`` (an iterable of ``(x, y)`` whose order depends
    only on the seed and the epoch). Returns the history ``{"epochs": [...], "steps": [...]}``.

    Loss: cross-entropy (or :func:`distillation_loss` with ``teacher``) + ``extra_loss(model)``.
    After each ``optimizer.step()``: ``on_step(model, global_step)`` (1-based count of steps done).
    ``evaluate_fn(model) -> dict`` runs at each epoch end; its numbers go into ``history["epochs"]``.
    ``extra_state=(get, set)``: ``get(model) -> dict`` of plain data saved with every checkpoint and
    ``set(model, dict)`` applied on resume (state a compression method keeps outside tensors).
    With ``checkpoint_path``: saves every ``config.checkpoint_every`` steps, at each epoch end, and
    on SIGINT/SIGTERM (then raises KeyboardInterrupt). ``resume=True`` continues from an existing
    checkpoint bit-exactly (RNG included); without one it starts fresh.
    """
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not callable(train_batches):
        raise DataError("train_batches must be a function epoch -> iterable of (x, y) batches")
    if resume and checkpoint_path is None:
        raise ConfigError("resume=True needs a checkpoint_path")
    device = _device(model)
    D.broadcast_module_(model)            # under torch.distributed: every rank starts from rank 0's weights
    optimizer = _make_optimizer(model, config, param_groups)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ckpt = None
    if resume and Path(checkpoint_path).exists():
        ckpt = read_checkpoint(checkpoint_path)  # CheckpointError if it is not one (or damaged)
        _check_resume_config(ckpt, config, checkpoint_path)
    if ckpt is None:
        seed_everything(config.seed)
        st = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "loss_sum": 0.0,
              "history": {"epochs": [], "steps": []}}
    else:
        st = dict(ckpt["trainer_state"])
    history = st["history"]
    if ckpt is not None and extra_state is not None and "extra_state" in st:
        extra_state[1](model, st["extra_state"])
    if st["epoch"] >= config.epochs:  # already finished: hand back the final state
        if ckpt is not None:
            apply_checkpoint(ckpt, checkpoint_path, model=model, optimizer=optimizer)
        return history
    first_batches = train_batches(st["epoch"])
    steps_per_epoch = len(first_batches) if hasattr(first_batches, "__len__") else None
    per_step_sched = steps_per_epoch is not None
    scheduler = _make_scheduler(optimizer, config, steps_per_epoch)
    if ckpt is not None:
        apply_checkpoint(ckpt, checkpoint_path, model=model, optimizer=optimizer,
                         scheduler=scheduler, restore_rng_state=False)

    def save():
        if checkpoint_path is not None and D.is_main():      # rank 0 writes (atomically); all ranks resume
            more = {"extra_state": extra_state[0](model)} if extra_state is not None else {}
            save_checkpoint(checkpoint_path, model=model, optimizer=optimizer, scheduler=scheduler,
                            trainer_state=dict(st, config=config.to_dict(), **more))

    was_training = model.training
    teacher_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.eval()
        t_device = _device(teacher)
    bar = None
    try:
        with _StopOnSignal() as stop:
            first = True
            for epoch in range(st["epoch"], config.epochs):
                batches = first_batches if first else train_batches(epoch)
                skip = st["step_in_epoch"] if first else 0
                resuming, first = first and ckpt is not None, False
                if resuming and skip == 0:
                    restore_rng(ckpt["rng"])  # before iterating, as the uninterrupted run did
                it = iter(batches)
                for i in range(skip):  # resume mid-epoch: regenerate the epoch, skip what was done
                    if next(it, None) is None:
                        raise DataError(f"train_batches({epoch}) yielded only {i} batches, but the "
                                        f"checkpoint is at step {skip} of this epoch: the data changed")
                if resuming and skip > 0:
                    restore_rng(ckpt["rng"])  # after regenerating/skipping, as at save time
                model.train()
                total = len(batches) if hasattr(batches, "__len__") else None
                bar = tqdm(total=total, initial=skip, desc=f"epoch {epoch + 1}/{config.epochs}",
                           disable=not config.progress, file=sys.stderr, mininterval=0.5,
                           leave=False, dynamic_ncols=True)
                loss_sum = torch.tensor(st["loss_sum"], dtype=torch.float64, device=device)
                for batch in it:
                    x, y = D.shard(_unpack(batch, f"train_batches({epoch})"))   # this rank's rows
                    x, y = _to(x, device), _to(y, device)
                    logits = _logits(model, x)
                    if teacher is not None:
                        with torch.no_grad():
                            t_logits = _logits(teacher, _to(x, t_device)).to(device)
                        loss = distillation_loss(logits, t_logits, y, config.distill_alpha,
                                                 config.distill_temperature)
                    else:
                        loss = F.cross_entropy(logits, y)
                    if extra_loss is not None:
                        loss = loss + extra_loss(model)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    D.average_gradients_(params)   # = the gradient of the global batch's mean loss
                    if config.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                    optimizer.step()
                    if scheduler is not None and per_step_sched:
                        scheduler.step()
                    st["global_step"] += 1
                    st["step_in_epoch"] += 1
                    if on_step is not None:
                        on_step(model, st["global_step"])
                    loss = D.all_reduce_(loss.detach().clone(), "mean") if D.active() else loss
                    loss_sum += loss.detach().double()
                    bar.update(1)
                    if st["global_step"] % config.log_every == 0:
                        rec = {"step": st["global_step"], "epoch": epoch, "loss": loss.item(),
                               "lr": optimizer.param_groups[0]["lr"]}
                        history["steps"].append(rec)
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.3g}", refresh=False)
                    due = config.checkpoint_every and st["global_step"] % config.checkpoint_every == 0
                    if due or stop.stop:
                        st["loss_sum"] = loss_sum.item()
                        save()
                    if stop.stop:
                        where = f"; checkpoint saved to {checkpoint_path}" if checkpoint_path else ""
                        raise KeyboardInterrupt(f"training stopped by signal {stop.stop} at epoch "
                                                f"{epoch}, step {st['step_in_epoch']}{where}")
                bar.close()
                if st["step_in_epoch"] == 0:
                    raise DataError(f"train_batches({epoch}) yielded no batch")
                if scheduler is not None and not per_step_sched:
                    scheduler.step()
                rec = {"epoch": epoch, "loss": loss_sum.item() / st["step_in_epoch"],
                       "lr": optimizer.param_groups[0]["lr"], "global_step": st["global_step"]}
                if evaluate_fn is not None:
                    metrics = evaluate_fn(model) or {}
                    rec.update({k: (float(v) if isinstance(v, (torch.Tensor, np.generic)) else v)
                                for k, v in metrics.items()})
                    model.train()
                history["epochs"].append(rec)
                st.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0)
                save()
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
        if teacher is not None:
            teacher.train(teacher_training)
    return history


def evaluate(model: torch.nn.Module, batches: Iterable, progress: bool = False) -> dict:
    """Accuracy and mean cross-entropy over ``batches`` of ``(x, y)``, in eval mode, without grad.

    Returns ``{"accuracy", "loss", "n"}``; the model's train/eval mode is restored afterwards.
    """
    device = _device(model)
    was_training = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, disable=not progress, desc="eval", file=sys.stderr,
                              mininterval=0.5, leave=False):
                x, y = _unpack(batch, "evaluate()'s batches")
                x, y = _to(x, device), _to(y, device)
                logits = _logits(model, x)
                loss += F.cross_entropy(logits, y, reduction="sum").double()
                correct += (logits.argmax(-1) == y).sum()
                n += y.numel()
    finally:
        model.train(was_training)
    if n == 0:
        raise DataError("evaluate() got no batch")
    return {"accuracy": correct.item() / n, "loss": loss.item() / n, "n": n}
