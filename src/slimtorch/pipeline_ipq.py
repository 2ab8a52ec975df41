"""The ``ipq`` step of ``run_recipe`` (recipe_ipq.py), built from the public verbs: for each stage,
``ipq_stages`` product-quantizes its layers (k-means), then ``train`` fine-tunes with
``pq_param_groups`` (the centroids, gradient averaged over their blocks, and the weights not yet
quantized; the stored weights of quantized layers are frozen), fairseq's ``Quantizer`` loop
(papers.md Sec. 6a: rebuild the optimizer after each stage, equal budget per stage).

Each stage checkpoints in the output folder (``ipq-stage<i>.ckpt``); on resume the stage's k-means
runs again (deterministic: the same codes) and the checkpoint restores its fine-tuned centroids."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .pq import ipq_stages, pq_param_groups
from .search.penalty import step
from .train import evaluate, train


class StepBatches:
    """Exactly ``steps`` batches from ``loader``, running on through its epochs (seeded orders):
    the ``steps`` of one stage as one epoch of known length (so the cosine schedule spans it)."""

    def __init__(self, loader, steps: int):
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        done, epoch = 0, 0
        while done < self.steps:
            n = 0
            for batch in self.loader.batches(epoch):
                if done == self.steps:
                    return
                yield batch
                done, n = done + 1, n + 1
            if n == 0:
                return
            epoch += 1


def run_ipq(model, recipe, loaders, out: Path, metrics: dict, resume: bool = False) -> None:
    """The recipe's iPQ stages on ``model`` in place; ``loaders(section) -> (TrainConfig, train,
    test)`` as in run_recipe. Adds ``metrics["ipq"]``: per stage its layers and block sizes, the
    held-out accuracy right after k-means and after the fine-tuning, and the fine-tuning steps."""
    ip = recipe.ipq
    cfg, tr, test = loaders(ip["finetune"] or {})
    steps = ip["steps"]
    if steps is not None:
        cfg = replace(cfg, epochs=1 if steps > 0 else 0)
        batches = lambda _epoch: StepBatches(tr, steps)            # noqa: E731
    else:
        batches = tr.batches
    rows = []
    pats, cfgs = [p for p, _ in ip["stages"]], [c for _, c in ip["stages"]]
    for stage in ipq_stages(model, pats, cfgs, exclude=ip["exclude"]):
        row = {"stage": stage.index, "include": list(stage.include), "layers": list(stage.layers),
               "n_centroids": stage.config.n_centroids,
               "accuracy_kmeans": evaluate(model, test.batches(0))["accuracy"]}
        done = 0
        if cfg.epochs > 0:
            groups = pq_param_groups(model, lr=cfg.lr, centroids_lr=ip["centroids_lr"],
                                     weight_decay=cfg.weight_decay)
            hist = train(model, batches, cfg, checkpoint_path=out / f"ipq-stage{stage.index}.ckpt", resume=resume,
                         on_step=lambda m, _s: step(m), param_groups=groups)
            done = hist["epochs"][-1]["global_step"] if hist["epochs"] else 0
        row.update(accuracy=evaluate(model, test.batches(0))["accuracy"], steps=done)
        rows.append(row)
    metrics["ipq"] = {"stages": rows}


__all__ = ["run_ipq", "StepBatches"]
