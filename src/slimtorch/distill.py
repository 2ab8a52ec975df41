"""Distillation losses usable in any training loop (and by the trainer, train.py).

``distill_loss``: the movement-pruning reference's (papers.md Sec. 5a; Hinton et al. 2015)
    alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)
with KL = ``kl_div(log_softmax(z_s/T), softmax(z_t/T), reduction="batchmean")`` (the reference sets
alpha_distil = alpha_ce = 0.5, T = 2). ``hidden_state_loss``: MSE between chosen hidden states of
student and teacher (encoders: HF ``output_hidden_states``), padding excluded with a mask."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import ConfigError


def _check(T, alpha):
    if isinstance(T, bool) or not isinstance(T, (int, float)) or not math.isfinite(T) or T <= 0:
        raise ConfigError(f"distill_loss: T={T!r}; expected a temperature > 0")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ConfigError(f"distill_loss: alpha={alpha!r}; expected a weight in [0, 1]")


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 2.0,
                 alpha: float = 0.5, labels: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * CE(student, labels).
    Without ``labels`` only the T^2 * KL term (alpha does not apply). Logits [..., classes]: every
    leading position (e.g. tokens) is one row of the batch mean. The teacher gets no gradient."""
    _check(T, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(f"distill_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                          f"{tuple(teacher_logits.shape)} differ in shape")
    c = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, c), teacher_logits.detach().reshape(-1, c).to(student_logits.dtype)
    kl = F.kl_div(F.log_softmax(s / T, dim=-1), F.softmax(t / T, dim=-1), reduction="batchmean") * (T * T)
    if labels is None:
        return kl
    return alpha * kl + (1 - alpha) * F.cross_entropy(s, labels.reshape(-1))


def hidden_state_loss(student_hidden, teacher_hidden, pairs=None, attention_mask=None) -> torch.Tensor:
    """Mean over ``pairs`` [(student index, teacher index), ...] of the MSE between those hidden
    states ([batch, seq, dim] tensors, e.g. HF ``outputs.hidden_states``); ``pairs`` None: all, when
    both sides have as many. ``attention_mask`` [batch, seq] (1 = token): padding is left out."""
    hs, ht = list(student_hidden), list(teacher_hidden)
    if pairs is None:
        if len(hs) != len(ht):
            raise ConfigError(f"hidden_state_loss: the student has {len(hs)} hidden states, the teacher "
                              f"{len(ht)}: pass pairs=[(student_index, teacher_index), ...]")
        pairs = [(i, i) for i in range(len(hs))]
    if not pairs:
        raise ConfigError("hidden_state_loss: no pairs of hidden states to match")
    terms = []
    for i, j in pairs:
        if not (-len(hs) <= i < len(hs) and -len(ht) <= j < len(ht)):
            raise ConfigError(f"hidden_state_loss: pair ({i}, {j}) is out of range: the student has "
                              f"{len(hs)} hidden states, the teacher {len(ht)}")
        s, t = hs[i], ht[j].detach().to(hs[i].dtype)
        if s.shape != t.shape:
            raise ConfigError(f"hidden_state_loss: pair ({i}, {j}): shapes {tuple(s.shape)} and "
                              f"{tuple(t.shape)} differ")
        if attention_mask is None:
            terms.append(F.mse_loss(s, t))
        else:
            w = attention_mask.to(s.dtype).reshape(*attention_mask.shape, *([1] * (s.dim() - attention_mask.dim())))
            w = w.expand_as(s)
            terms.append(((s - t) ** 2 * w).sum() / w.sum().clamp_min(1))
    return torch.stack(terms).mean()


__all__ = ["distill_loss", "hidden_state_loss"]
