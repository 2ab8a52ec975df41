"""``run_recipe``: the CLI's main job, built only from public library verbs.

data -> model -> float training (or float checkpoint) -> evaluate -> [fold_batchnorm_] -> [prune_] ->
quantize_ + calibrate -> fine-tune (QAT; the pruning schedule advances with st.step, soft movement's
penalty joins the loss) -> [reestimate_bn_] -> [iPQ stages: pq_ + fine-tuning of the centroids and
the weights not yet quantized, pipeline_ipq.py] -> evaluate -> report -> packed export -> metrics.json +
report.md. Quant-Noise (``quant_noise`` section) is attached before its stage's training (the float
training or the fine-tuning) and removed right after it.
Each training stage checkpoints atomically in the output folder; ``resume=True`` continues there.
Every generator is seeded from the recipe before anything is built, so two runs of a recipe give the
same bytes; model-dependent checks (preflight.py) run before training; stale temporary files of a
killed run are removed at the start."""
from __future__ import annotations

import contextlib
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import distributed as D
from .atomic import atomic_write_text, remove_stale_temporaries
from .checkpoint import load_checkpoint
from .data import load_dataset, make_loaders
from .errors import CheckpointError, ConfigError
from .export import export_onnx, save_packed
from .models import build_model
from .pipeline_ipq import run_ipq
from .preflight import preflight
from .pq import quant_noise_, remove_quant_noise_
from .prune import prune_, prune_param_groups, pruned_layers, sparsity
from .quant import calibrate, fold_batchnorm_, quantize_, reestimate_bn_
from .recipe import Recipe
from .report import report
from .search.bit_freeze import freeze_state, load_freeze_state
from .search.penalty import penalty, read_plan, step
from .train import TrainConfig, evaluate, seed_everything, train


def load_float_weights(model: torch.nn.Module, path) -> None:
    """Float weights from a slimtorch checkpoint or a plain safetensors state dict (never a pickle)."""
    path = Path(path)
    try:
        load_checkpoint(path, model=model, restore_rng=False)
        return
    except CheckpointError as e:
        if "slimtorch" not in str(e) or not path.is_file():
            raise
    from safetensors.torch import load_file
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise CheckpointError(f"{path}: not a slimtorch checkpoint nor a safetensors state dict ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model: missing {missing}, unexpected {unexpected}")


def _train_config(section: dict, seed: int) -> TrainConfig:
    return TrainConfig(**{"seed": seed, **section})


def _export(model, out: Path, recipe: Recipe, example) -> dict:
    """The packed file (bit-packed codes + safetensors/JSON), and ONNX when the recipe asks.
    Under torch.distributed rank 0 writes and the other ranks wait for it."""
    name = recipe.export.get("path", "model.slim")
    if not D.is_main():
        D.barrier()
        return {"path": name, "file_bytes": (out / name).stat().st_size, "format": "slim"}
    try:
        return _write_export(model, out, recipe, example, name)
    finally:
        D.barrier()


def _write_export(model, out: Path, recipe: Recipe, example, name: str) -> dict:
    save_packed(model, out / name)
    info = {"path": name, "file_bytes": (out / name).stat().st_size, "format": "slim"}
    if recipe.export.get("onnx"):
        export_onnx(model, out / recipe.export["onnx"], example, kernels=recipe.export.get("onnx_kernels", "qdq"),
                    fuse_skip_layernorm=recipe.export.get("onnx_fuse_skip_layernorm", False))
        info["onnx"] = recipe.export["onnx"]
    return info


def _groups(model, cfg):
    """Adam/AdamW with learned-bit quantizers: their parameters at a relative learning rate
    (quant/param_groups.py), so a budget is met in tens of steps; None (one group) otherwise."""
    from .quant.param_groups import _learned_quantizers, quantizer_param_groups
    if cfg.optimizer == "sgd" or not _learned_quantizers(model):
        return None
    return quantizer_param_groups(model, lr=cfg.lr)


def _all_groups(model, cfg):
    """``_groups`` plus the mask scores of movement pruning at their own learning rate."""
    groups = _groups(model, cfg)
    if not any(hasattr(mk, "scores") for *_, mk in pruned_layers(model)):
        return groups
    return prune_param_groups(model, lr=cfg.lr, base=groups)


@contextlib.contextmanager
def _noise(model, recipe: Recipe, stage: str, metrics: dict):
    """Quant-Noise attached for the training of ``stage`` when the recipe puts it there, then removed."""
    cfg, sel = recipe.quant_noise, recipe.noise_select
    if cfg is None or sel.get("stage") != stage:
        yield
        return
    quant_noise_(model, cfg, include=sel.get("include"), exclude=sel.get("exclude"))
    try:
        yield
    finally:
        layers = remove_quant_noise_(model)
    metrics["quant_noise"] = {"stage": stage, "mode": cfg.mode, "p": cfg.p, "layers": layers}


def run_recipe(recipe: Recipe, out_dir, *, resume: bool = False, progress: bool = True) -> dict:
    """Execute ``recipe`` writing into ``out_dir``; returns the metrics (also in metrics.json).
    File paths in the metrics are relative to ``out_dir``; wall times are under ``timing``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if D.is_main():
        remove_stale_temporaries(out)
    t0 = time.time()
    seed_everything(recipe.seed)     # before the data and the model: their init draws from it
    bundle = load_dataset(recipe.data["name"], **recipe.data.get("options", {}))
    kwargs = {"num_classes": bundle.num_classes, **recipe.model.get("kwargs", {})}
    model = build_model(recipe.model["name"], **kwargs)
    eval_bs = recipe.data.get("eval_batch_size", 256)

    def loaders(section):
        cfg = _train_config(section or {}, recipe.seed)
        if not progress:
            cfg = replace(cfg, progress=False)
        tr, te = make_loaders(bundle, batch_size=cfg.batch_size, seed=recipe.seed, test_batch_size=eval_bs)
        return cfg, tr, te

    preflight(model, recipe, loaders(recipe.finetune if recipe.compress else recipe.train)[1].batches(0))
    metrics: dict = {"recipe": recipe.name, "dataset": bundle.name, "model": recipe.model["name"],
                     "seed": recipe.seed, "timing": {}}
    if recipe.model.get("checkpoint"):
        load_float_weights(model, recipe.model["checkpoint"])
        _, _, test = loaders(recipe.train)
    else:
        cfg, tr, test = loaders(recipe.train)
        with _noise(model, recipe, "train", metrics):     # st.step: the refits of pq_exact noise
            train(model, tr.batches, cfg, checkpoint_path=out / "float.ckpt", resume=resume,
                  on_step=lambda m, _s: step(m))
    metrics["fp32_accuracy"] = evaluate(model, test.batches(0))["accuracy"]
    metrics["fp32_size_bytes"] = report(model).totals["fp32_bytes"]
    metrics["timing"]["fp32_seconds"] = round(time.time() - t0, 2)

    if recipe.compress is not None:
        sel = recipe.select
        plan = sel.get("plan")
        if sel.get("fold_bn"):      # before the search and quantize_: the folded weights are deployed
            x = next(iter(loaders(recipe.finetune)[1].batches(0)))[0]
            folded = fold_batchnorm_(model, x, warn=False)
            metrics["fold_bn"] = {"folded": [list(p) for p in folded.folded], "skipped": folded.skipped}
        if recipe.search is not None:
            plan = _search(model, recipe, loaders(recipe.finetune)[1], out, metrics, progress)
        if recipe.prune is not None:    # masks before the quantizers: W' = Q(W * M)
            prune_(model, recipe.prune, include=recipe.prune_select.get("include"),
                   exclude=recipe.prune_select.get("exclude"))
        quantize_(model, recipe.compress, include=sel.get("include"), exclude=sel.get("exclude"),
                  plan=plan)
        cfg, tr, test = loaders(recipe.finetune)
        calib = itertools.islice(tr.batches(0), sel.get("calibrate_batches", 8))
        qat = recipe.finetune is not None and cfg.epochs > 0    # QAT learns its rounding from the float weights
        calibrate(model, [D.shard(b) for b in calib],          # each rank observes its rows; merged over ranks
                  rounding="nearest" if qat else "auto")
        metrics["calibrated_accuracy"] = evaluate(model, test.batches(0))["accuracy"]
        if qat:
            # budget penalties (Uhlich) and per-step value clipping: no-ops for methods without them
            with _noise(model, recipe, "finetune", metrics):
                train(model, tr.batches, cfg, checkpoint_path=out / "finetune.ckpt", resume=resume,
                      extra_loss=penalty, on_step=lambda m, _s: step(m), param_groups=_all_groups(model, cfg),
                      extra_state=(freeze_state, load_freeze_state))
        if sel.get("reestimate_bn"):   # BN statistics of the quantized model (cumulative average)
            seen = reestimate_bn_(model, tr.batches(0), num_batches=sel["reestimate_bn"])
            metrics["reestimate_bn"] = {"layers": sorted(seen), "batches": max(seen.values(), default=0)}
        metrics["plan"] = read_plan(model)
        if recipe.prune is not None:
            sp = sparsity(model)
            from .cost import model_costs
            metrics["prune"] = {"method": type(recipe.prune).method, "kept": sp["kept"], "weights": sp["weights"],
                                "sparsity": round(sp["sparsity"], 6),
                                "stored_bytes": model_costs(model)["stored_bytes"]}   # masks + kept codes
    if recipe.ipq is not None:       # product quantization, stage by stage (pipeline_ipq.py)
        run_ipq(model, recipe, loaders, out, metrics, resume=resume)
    rep = report(model)
    metrics["accuracy"] = evaluate(model, test.batches(0))["accuracy"]
    metrics["size_bytes"] = rep.totals["bytes"]
    metrics["compression"] = round(rep.totals["compression"], 3)
    metrics["layers"] = [{k: r[k] for k in ("name", "kind", "w_bits", "a_bits", "params", "bytes")}
                         for r in rep.rows]
    metrics["export"] = _export(model, out, recipe, next(iter(test.batches(0)))[0][:1])
    metrics["timing"]["seconds"] = round(time.time() - t0, 2)
    _write_json(out / "metrics.json", metrics)
    if D.is_main():
        atomic_write_text(out / "report.md", _markdown(metrics, rep))
    return metrics


def _search(model, recipe: Recipe, train_loader, out: Path, metrics: dict, progress: bool) -> dict:
    """Run the recipe's bit-allocation search (HAWQ-V2 or EBS) on the float model; returns its plan."""
    from .search.ebs import EBSConfig
    from .search.hawq import HAWQConfig, hawq_search
    from .search.pareto_plot import plot_frontier

    if not isinstance(recipe.search, (HAWQConfig, EBSConfig)):
        raise ConfigError(f"search method {type(recipe.search).method!r} cannot produce a plan here")
    sel = recipe.select
    cfg = recipe.search
    if cfg.include is None and cfg.exclude is None and (sel.get("include") or sel.get("exclude")):
        cfg = replace(cfg, include=sel.get("include"), exclude=sel.get("exclude"))
    if isinstance(cfg, EBSConfig):
        from .search.ebs_search import ebs_search
        result = ebs_search(model, train_loader.batches, cfg, quant=recipe.compress, progress=progress)
        _write_json(out / "ebs.json", result.as_dict())
        metrics["search"] = {"method": "ebs", "budget": result.budget, "target": result.target,
                             "value": result.value, "argmax_value": result.argmax_value,
                             "seconds": result.seconds}
        return result.plan
    result = hawq_search(model, train_loader.batches(0), cfg, quant=recipe.compress, progress=progress)
    _write_json(out / "hawq.json", result.as_dict())
    if D.is_main():
        plot_frontier(result, out / "hawq_frontier.png", title=recipe.name)
    metrics["search"] = {"method": "hawq", "budget": result.budget, "target": result.target,
                         "value": result.value, "omega_total": result.omega_total}
    return result.plan


def _write_json(path: Path, data) -> None:
    if D.is_main():                       # under torch.distributed: rank 0 writes
        atomic_write_text(path, json.dumps(data, indent=2))


def _markdown(m: dict, rep) -> str:
    lines = [f"# slimtorch report: {m['recipe']}", "",
             f"- dataset `{m['dataset']}`, model `{m['model']}`",
             f"- FP32 accuracy {100 * m['fp32_accuracy']:.2f}% -> compressed {100 * m['accuracy']:.2f}%",
             f"- size {m['fp32_size_bytes']:,} B -> {m['size_bytes']:,} B (x{m['compression']}); "
             f"file `{Path(m['export']['path']).name}` {m['export']['file_bytes']:,} B", "",
             rep.to_markdown()]
    return "\n".join(lines)
