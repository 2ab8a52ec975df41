"""The recipe step ``ipq`` (iterative product quantization, Fan et al. 2021 / Stock et al. 2020;
fairseq ``quantization_utils.Quantizer``, papers.md Sec. 6a): validated with the other sections,
before any work. It runs after the float training (and after compress / finetune when the recipe
has them), one stage at a time: ``pq_`` on the stage's layers, then ``finetune`` of the centroids
and the not-yet-quantized weights (``pq_param_groups``), then the packed export.

    ipq:
      stages:                    # default: one stage of every quantizable layer (exclude aside)
        - [conv1, conv2]         # a glob or a list of globs per stage (fairseq: FFN -> emb -> attn)
        - {include: "fc*", block_size: 4}    # or a mapping: include + PQ keys for this stage only
      exclude: null              # globs never quantized (e.g. the first conv)
      n_centroids: 256           # PQ keys (pq/configs.py) for every stage: n_centroids, block_size,
      block_sizes: null          #   block_sizes, n_iter, seed, int8_centroids
      finetune: {epochs: 1, lr: 0.001, batch_size: 64}   # per stage (TrainConfig keys); epochs 0: none
      steps: null                # or exactly this many optimizer steps per stage (instead of epochs)
      centroids_lr: null         # the centroids' learning rate (default: finetune.lr)

Unknown keys are named; a stage pattern that matches no layer (or only layers of earlier stages)
fails in preflight, right after the model is built; layers of an ipq stage must not be scalar
quantized by ``compress`` too (the packed format stores a codebook layer without a scalar weight
quantizer: use ``int8_centroids``)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional, Union

from .config import config_from_dict, config_to_dict
from .errors import ConfigError
from .schema import build, check_mapping

Globs = Optional[Union[str, tuple[str, ...]]]
ALL = "*"          # the default single stage: every quantizable layer


@dataclass(frozen=True)
class IPQSelect:
    """The ipq keys that are not PQ config keys."""
    stages: Optional[tuple[Union[str, tuple[str, ...], dict[str, Any]], ...]] = None
    exclude: Globs = None
    finetune: Optional[dict[str, Any]] = None
    steps: Optional[int] = None
    centroids_lr: Optional[float] = None

    def __post_init__(self):
        if self.stages is not None and not self.stages:
            raise ConfigError("stages: expected at least one stage (or leave it out: one stage of every layer)")
        if self.steps is not None and self.steps < 0:
            raise ConfigError(f"steps={self.steps}: expected an integer >= 0 (0: no fine-tuning)")
        if self.centroids_lr is not None and self.centroids_lr <= 0:
            raise ConfigError(f"centroids_lr={self.centroids_lr}: expected a number > 0")


def _patterns(value, where: str) -> tuple:
    pats = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else None
    if not pats or not all(isinstance(p, str) and p for p in pats):
        raise ConfigError(f"{where}: expected a glob or a non-empty list of globs, got {value!r}")
    return pats


def parse_ipq_section(doc: dict, name: str) -> dict | None:
    """The ``ipq`` section as {"stages": [(patterns, PQ)], "exclude", "finetune" (TrainConfig keys
    given), "steps", "centroids_lr"}, or None when absent."""
    from .train import TrainConfig

    if doc.get("ipq") is None:
        return None
    where = f"{name}: ipq"
    body = dict(check_mapping(doc["ipq"], where))
    keys = {f.name for f in fields(IPQSelect)}
    given = {k: body.pop(k) for k in list(body) if k in keys}
    sel = build(IPQSelect, given, where)
    if body.setdefault("method", "pq") != "pq":
        raise ConfigError(f"{where}: method {body['method']!r}; this section takes method pq only")
    base = config_from_dict(body, where=where)
    stages = []
    for i, st in enumerate(sel.stages or (ALL,)):
        at = f"{where}.stages[{i}]"
        if isinstance(st, dict):
            over = dict(st)
            if "include" not in over:
                raise ConfigError(f"{at}: a stage mapping needs 'include' (a glob or a list of globs)")
            pats = _patterns(over.pop("include"), f"{at}.include")
            if "method" in over:
                raise ConfigError(f"{at}: 'method' is not a stage key (every stage is pq)")
            cfg = config_from_dict({**config_to_dict(base), **over}, where=at)
        else:
            pats, cfg = _patterns(st, at), base
        stages.append((pats, cfg))
    finetune = None
    if sel.finetune is not None:
        ft = build(TrainConfig, sel.finetune, f"{where}.finetune")
        finetune = {k: getattr(ft, k) for k in sel.finetune}
    if sel.steps is not None and finetune and "epochs" in finetune:
        raise ConfigError(f"{where}: give finetune.epochs or steps (per stage), not both")
    return {"stages": stages, "exclude": sel.exclude, "finetune": finetune, "steps": sel.steps,
            "centroids_lr": sel.centroids_lr}


__all__ = ["parse_ipq_section", "IPQSelect", "ALL"]
