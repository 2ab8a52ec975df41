"""Pruning configs (Sanh, Wolf & Rush 2020, "Movement Pruning", papers.md Sec. 5): frozen dataclasses
registered with the method configs (``config_from_dict({"method": "hard_movement", ...})``).

Schedule (schedule.py, the reference ``schedule_threshold``): ``total_steps`` optimizer
steps, cubic from the initial value to the final one between an initial warm-up of
``initial_warmup * warmup_steps`` steps and a final warm-up of ``final_warmup * warmup_steps`` steps
(the reference defaults: 1 and 2 warm-up units). ``min_keep``: every layer keeps at least
int(min_keep * n) + 1 of its n weights (0.5%, the reference ``ThresholdBinarizer``)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import register_config
from ..errors import ConfigError
from .structure import STRUCTURES

SCOPES = ("layer", "global")
MIN_KEEP = 0.005


def _num(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int)


@dataclass(frozen=True)
class PruneConfig:
    """Fields shared by every unstructured pruning method.

    total_steps: optimizer steps of the pruning run (``st.step(model)`` after each); 0 = one shot
        (the final sparsity from the start; magnitude only).
    warmup_steps, initial_warmup, final_warmup: the warm-ups (schedule.py), in steps x units.
    min_keep: the fraction every layer keeps at least (>= 0.005).
    embeddings: also prune nn.Embedding weights (frozen by default, as the paper).
    structure: "unstructured" (one score per weight, the paper), "blocks" (``block`` = (bh, bw)
        tiles of the (out, in * kernel) view, nn_pruning's block movement), "rows" (output units),
        "columns" (input units), "heads" (attention heads: q/k/v rows + output-projection columns
        share one score) or "neurons" (FFN neurons: first Linear's row + second's column); scores
        are aggregated per group (structure.py). Heads and neurons can be removed by ``shrink_``.
    block: (bh, bw), the tile of ``structure="blocks"`` (32 x 32 by default)."""
    total_steps: int = 0
    warmup_steps: int = 0
    initial_warmup: float = 1.0
    final_warmup: float = 2.0
    min_keep: float = MIN_KEEP
    embeddings: bool = False
    structure: str = "unstructured"
    block: tuple[int, int] = (32, 32)

    needs_steps = False       # movement methods learn scores: they need a run

    def __post_init__(self):
        name = type(self).__name__
        if not _int(self.total_steps) or self.total_steps < 0:
            raise ConfigError(f"{name}: total_steps={self.total_steps!r}; expected an integer >= 0 "
                              "(the optimizer steps of the pruning run)")
        if self.needs_steps and self.total_steps < 1:
            raise ConfigError(f"{name}: total_steps={self.total_steps!r}; movement pruning learns its "
                              "scores during training: give the number of optimizer steps (>= 1)")
        if not _int(self.warmup_steps) or self.warmup_steps < 0:
            raise ConfigError(f"{name}: warmup_steps={self.warmup_steps!r}; expected an integer >= 0")
        for f in ("initial_warmup", "final_warmup"):
            v = getattr(self, f)
            if not _num(v) or v < 0:
                raise ConfigError(f"{name}: {f}={v!r}; expected a number >= 0 (in units of warmup_steps)")
        warm = (self.initial_warmup + self.final_warmup) * self.warmup_steps
        if self.total_steps > 0 and warm > self.total_steps:
            raise ConfigError(
                f"{name}: the warm-ups ((initial_warmup {self.initial_warmup:g} + final_warmup "
                f"{self.final_warmup:g}) x warmup_steps {self.warmup_steps} = {warm:g} steps) are longer "
                f"than the run (total_steps={self.total_steps})")
        if not _num(self.min_keep) or not MIN_KEEP <= self.min_keep <= 1:
            raise ConfigError(f"{name}: min_keep={self.min_keep!r}; expected a fraction in "
                              f"[{MIN_KEEP}, 1] (never fewer than 0.5% of a layer's weights are kept)")
        if not isinstance(self.embeddings, bool):
            raise ConfigError(f"{name}: embeddings={self.embeddings!r}; expected true or false")
        if self.structure not in STRUCTURES:
            raise ConfigError(f"{name}: structure={self.structure!r}; expected one of {STRUCTURES}")
        b = self.block
        if not isinstance(b, (tuple, list)) or len(b) != 2 or not all(_int(v) and v >= 1 for v in b):
            raise ConfigError(f"{name}: block={b!r}; expected two integers >= 1 (rows, columns of a tile)")
        object.__setattr__(self, "block", tuple(b))
        if self.structure in ("heads", "neurons") and self.embeddings:
            raise ConfigError(f"{name}: structure={self.structure!r} prunes attention / FFN Linears; "
                              "embeddings=true does not apply")

    # the schedule's endpoints (schedule.py): overridden per method
    def initial_value(self) -> float:
        return 1.0

    def final_value(self) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class TopKConfig(PruneConfig):
    """Top-k methods: keep the ``remaining`` fraction (in (0, 1]) of each layer's weights (``scope``
    "layer") or of all pruned weights together (``scope`` "global": one threshold over every
    layer's importance, recomputed every ``global_every`` steps and at the last step, 25 in the
    reference). The kept fraction follows the cubic schedule from 1 to ``remaining``."""
    remaining: float = 0.1
    scope: str = "layer"
    global_every: int = 25

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if not _num(self.remaining) or not 0 < self.remaining <= 1:
            raise ConfigError(f"{name}: remaining={self.remaining!r} is outside (0, 1]: the fraction of "
                              "weights kept at the end (0.1 keeps 10%)")
        if self.scope not in SCOPES:
            raise ConfigError(f"{name}: scope={self.scope!r}; expected one of {SCOPES}")
        if not _int(self.global_every) or self.global_every < 1:
            raise ConfigError(f"{name}: global_every={self.global_every!r}; expected an integer >= 1 "
                              "(steps between recomputations of the global threshold)")

    def final_value(self) -> float:
        return float(self.remaining)


def _check_lr(cfg):
    if not _num(cfg.scores_lr) or cfg.scores_lr <= 0:
        raise ConfigError(f"{type(cfg).__name__}: scores_lr={cfg.scores_lr!r}; expected a number > 0 "
                          "(the learning rate of the mask scores, 1e-2 in the paper)")


@register_config("magnitude")
@dataclass(frozen=True)
class Magnitude(TopKConfig):
    """Magnitude pruning baseline: M = TopK(|W|, v_t), no extra parameters (papers.md Sec. 5a).
    Pruned weights get no gradient (dL/dW = dL/dW' * M)."""


@register_config("hard_movement")
@dataclass(frozen=True)
class HardMovement(TopKConfig):
    """Hard movement pruning (Sanh et al. 2020, Sec. 3): scores S (init 0, own learning rate
    ``scores_lr``), M = TopK(S, v_t), straight-through so dL/dS = dL/dW' * W: with SGD the scores
    are S_t = -lr * sum_t (dL/dW'_t) * W_t, the weights' movement away from zero."""
    scores_lr: float = 1e-2
    needs_steps = True

    def __post_init__(self):
        super().__post_init__()
        _check_lr(self)


@register_config("soft_movement")
@dataclass(frozen=True)
class SoftMovement(PruneConfig):
    """Soft movement pruning (Sanh et al. 2020, Sec. 3): M = 1[sigmoid(S) > tau_t] (straight-through,
    dL/dS = dL/dW' * W), tau_t cubic from ``initial_tau`` (0) to ``tau`` (0.1), plus the regulariser
    lambda_t * R with R = mean over layers of sum(sigmoid(S_l)) / numel_l and lambda_t =
    ``lam`` * tau_t / tau (reference: final_lambda 400). The sparsity is not set: it emerges from
    lambda and has to be measured (``st.report`` / ``slimtorch.prune.sparsity``)."""
    tau: float = 0.1
    initial_tau: float = 0.0
    lam: float = 400.0
    scores_lr: float = 1e-2
    needs_steps = True

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if not _num(self.tau) or not 0 < self.tau < 1:
            raise ConfigError(f"{name}: tau={self.tau!r}; expected a threshold in (0, 1) on sigmoid(S)")
        if not _num(self.initial_tau) or not 0 <= self.initial_tau <= self.tau:
            raise ConfigError(f"{name}: initial_tau={self.initial_tau!r}; expected a number in [0, tau={self.tau}]")
        if not _num(self.lam) or self.lam < 0:
            raise ConfigError(f"{name}: lam={self.lam!r}; expected a number >= 0 (the final L1 lambda)")
        _check_lr(self)

    def initial_value(self) -> float:
        return float(self.initial_tau)

    def final_value(self) -> float:
        return float(self.tau)


__all__ = ["PruneConfig", "TopKConfig", "Magnitude", "HardMovement", "SoftMovement", "SCOPES", "MIN_KEEP"]
