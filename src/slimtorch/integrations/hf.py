"""Movement pruning (Sanh, Wolf & Rush 2020, papers.md Sec. 5) inside a ``transformers.Trainer``.

A ``TrainerCallback`` sees the model but cannot change the loss, so the pieces are split:

    PruneCallback      after each optimizer step ``st.step(model)`` (the cubic schedule and the
                       global thresholds); sparsity / kept weights added to every log; the report
                       (``st.report``) kept as ``callback.report`` at the end of training.
    PruneLossMixin     ``compute_loss`` = the task loss (or, with a ``teacher``, ``st.distill_loss``
                       against its logits at temperature T with weight alpha, the paper's
                       distillation) + ``st.penalty(model)`` (soft movement's lambda_t * R); and
                       ``create_optimizer`` with the mask scores at their own learning rate
                       (``st.prune_param_groups``; 1e-2 in the paper).
    PruneTrainer       ``PruneLossMixin`` + ``transformers.Trainer``, the callback added for you.

    st.prune_(model, st.SoftMovement(total_steps=T, warmup_steps=w), include="*encoder*")
    trainer = PruneTrainer(model=model, args=args, train_dataset=ds, teacher=teacher)
    trainer.train(); print(trainer.prune_callback.report)

With your own Trainer subclass: put ``PruneLossMixin`` first in its bases (or call
``add_prune_penalty(loss, model)`` in your ``compute_loss``) and pass ``callbacks=[PruneCallback()]``."""
from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback

from ..distill import distill_loss
from ..prune import prune_param_groups, sparsity
from ..report import report
from ..search.penalty import penalty, step


def add_prune_penalty(loss: torch.Tensor, model) -> torch.Tensor:
    """``loss + st.penalty(model)`` (zero when the model has no soft-movement mask or budget)."""
    return loss + penalty(model).to(loss.dtype)


def _sparsity_logs(model) -> dict:
    s = sparsity(model)
    return {"sparsity": round(float(s["sparsity"]), 6), "kept_weights": int(s["kept"])} if s["weights"] else {}


class PruneCallback(TrainerCallback):
    """``st.step(model)`` after every optimizer step, sparsity in the logs, the report at the end."""

    def __init__(self):
        self.report = None
        self.history: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            step(model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if model is None:
            return
        extra = _sparsity_logs(model)
        if logs is not None:
            for k, v in extra.items():
                logs.setdefault(k, v)
        self.history.append({"step": state.global_step, **extra})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.report = report(model)


def prune_optimizer(model, args) -> torch.optim.Optimizer:
    """AdamW as the Trainer's default, with the mask scores in their own groups (``scores_lr``, no
    weight decay) and every other trainable parameter at ``args.learning_rate`` / ``weight_decay``."""
    groups = prune_param_groups(model, lr=args.learning_rate, weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon)


class PruneLossMixin:
    """For a Trainer subclass: penalty (and optional distillation) in the loss, scores' own learning rate.

    ``teacher``: the uncompressed model (eval mode, no gradient); the loss becomes
    ``distill_loss(student_logits, teacher_logits, T, alpha, labels)`` (alpha * T^2 * KL +
    (1 - alpha) * CE, as the reference ``masked_run_glue.py``)."""

    teacher = None
    distill_T = 2.0
    distill_alpha = 0.5

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        if self.teacher is None:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        else:
            labels = inputs.get("labels")
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            with torch.no_grad():
                t_logits = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
            loss = distill_loss(outputs.logits, t_logits, T=self.distill_T, alpha=self.distill_alpha, labels=labels)
        loss = add_prune_penalty(loss, model)
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, *args, **kwargs):
        if getattr(self, "optimizer", None) is None:
            self.optimizer = prune_optimizer(self.model, self.args)
        return self.optimizer


class PruneTrainer(PruneLossMixin, Trainer):
    """``transformers.Trainer`` for a model pruned with ``st.prune_``: see the module docstring."""

    def __init__(self, *args, teacher=None, T: float = 2.0, alpha: float = 0.5, **kwargs):
        callbacks = list(kwargs.pop("callbacks", None) or [])
        self.prune_callback = next((c for c in callbacks if isinstance(c, PruneCallback)), None) or PruneCallback()
        if self.prune_callback not in callbacks:
            callbacks.append(self.prune_callback)
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self.teacher = teacher.eval() if teacher is not None else None
        self.distill_T, self.distill_alpha = T, alpha


__all__ = ["PruneCallback", "PruneLossMixin", "PruneTrainer", "add_prune_penalty", "prune_optimizer"]
