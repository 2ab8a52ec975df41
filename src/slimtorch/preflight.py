"""Checks that need the built model, run right after it is built and before any training.

Everything ``run_recipe`` would otherwise find out only after float training: include/exclude globs
that match no layer, plan entries, a HAWQ budget outside the feasible range of its bit grid, Uhlich
budgets that no bitwidth can meet (weights and activations), more calibration batches than the data
has, a missing optional dependency of the ONNX exporter, Quant-Noise block sizes and globs, iPQ stage
globs and block sizes. The compression is tried on a copy of the model with one batch; RNG states are restored afterwards, so a run is the same with or without it."""
from __future__ import annotations

import copy
import importlib.util
import random

import numpy as np
import torch

from .errors import ConfigError, PatternError

ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")


def check_export_dependencies(export: dict) -> None:
    if export.get("onnx"):
        missing = [m for m in ONNX_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"export.onnx needs the package(s) {', '.join(missing)}: "
                              "pip install 'slimtorch[onnx]' (or drop export.onnx)")


def _first_input(batches):
    for batch in batches:
        return batch[0] if isinstance(batch, (list, tuple)) else batch
    raise ConfigError("the training split yields no batch")


def check_compression(model: torch.nn.Module, recipe, train_batches):
    """Try the recipe's compression on a deep copy of ``model`` with one batch of ``train_batches``
    (a re-iterable of ``(x, y)``): every error it raises is the one the real run would raise later.
    Returns the compressed copy (None without a compress section)."""
    from .quant import calibrate, quantize_
    from .cost import trace_layers
    from .search.penalty import penalty

    if recipe.compress is None:
        return None
    sel = recipe.select
    n_batches = len(train_batches) if hasattr(train_batches, "__len__") else None
    want = sel.get("calibrate_batches", 8)
    if n_batches is not None and want > n_batches:
        raise ConfigError(f"compress.calibrate_batches={want}, but the training split has only "
                          f"{n_batches} batches at this batch size")
    x = _first_input(train_batches)
    trial = copy.deepcopy(model)
    if recipe.search is not None:
        from dataclasses import replace

        from .search.ebs import EBSConfig, cost_model
        from .search.hawq import HAWQConfig, check_budget

        cfg = recipe.search
        if not isinstance(cfg, (HAWQConfig, EBSConfig)):
            raise ConfigError(f"search method {type(cfg).method!r} cannot produce a plan here")
        if cfg.include is None and cfg.exclude is None and (sel.get("include") or sel.get("exclude")):
            cfg = replace(cfg, include=sel.get("include"), exclude=sel.get("exclude"))
        try:
            if isinstance(cfg, EBSConfig):
                if cfg.first_last == "float":
                    raise ConfigError("first_last='float' leaves layers float: in a recipe, exclude them "
                                      "in compress.exclude instead")
                cost_model(trial, cfg, recipe.compress, example_input=x)
            else:
                check_budget(trial, cfg, recipe.compress, example_input=x)
        except ConfigError as e:
            raise ConfigError(f"search: {e}") from None
    _check_prune_steps(recipe, n_batches)
    if sel.get("fold_bn"):
        from .quant import fold_batchnorm_
        try:
            fold_batchnorm_(trial, x, warn=False)
        except ConfigError as e:
            raise ConfigError(f"compress: {e}") from None
    if getattr(recipe, "prune", None) is not None:
        from .prune import prune_
        try:
            prune_(trial, recipe.prune, include=recipe.prune_select.get("include"),
                   exclude=recipe.prune_select.get("exclude"))
        except (ConfigError, PatternError) as e:
            raise type(e)(f"prune: {e}") from None
    try:
        quantize_(trial, recipe.compress, include=sel.get("include"), exclude=sel.get("exclude"),
                  plan=sel.get("plan"))
        calibrate(trial, [x], num_batches=1, rounding="nearest")
        with torch.no_grad():     # budgets that need activation sizes are checked here
            penalty(trial, shapes=trace_layers(trial, x))
    except ConfigError as e:
        raise ConfigError(f"compress: {e}") from None
    check_quant_noise(trial, recipe, x, "finetune")
    return trial


def check_ipq(trial: torch.nn.Module, recipe, x) -> None:
    """Run the recipe's iPQ stages on ``trial`` (a copy, compressed as the recipe compresses) with
    one k-means iteration: globs that match nothing (or only layers of earlier stages), block sizes
    that do not divide a layer, and layers scalar-quantized by compress fail here, named."""
    ip = getattr(recipe, "ipq", None)
    if ip is None:
        return
    import warnings
    from dataclasses import replace

    from .cost import weight_quantizer
    from .pq import ipq_stages
    try:
        with warnings.catch_warnings():          # k-means's fewer-centroids warning: the real run says it
            warnings.simplefilter("ignore")
            for stage in ipq_stages(trial, [p for p, _ in ip["stages"]],
                                    [replace(c, n_iter=1) for _, c in ip["stages"]], exclude=ip["exclude"]):
                for name in stage.layers:
                    if weight_quantizer(trial.get_submodule(name)) is not None:
                        raise ConfigError(f"stage {stage.index} ({list(stage.include)}): layer {name!r} is also "
                                          "scalar-quantized by 'compress'; the packed format stores a codebook layer "
                                          "without a scalar weight quantizer: exclude it from one of them (or use "
                                          "int8_centroids)")
        with torch.no_grad():
            trial(x)
    except (ConfigError, PatternError) as e:
        raise type(e)(f"ipq: {e}") from None


def check_quant_noise(trial: torch.nn.Module, recipe, x, stage: str) -> None:
    """Attach the recipe's Quant-Noise to ``trial`` (a copy) when its stage is ``stage`` and run one
    training-mode forward: block sizes and globs that do not fit the model fail here."""
    cfg, sel = getattr(recipe, "quant_noise", None), getattr(recipe, "noise_select", {})
    if cfg is None or sel.get("stage") != stage:
        return
    from .pq import quant_noise_
    try:
        quant_noise_(trial, cfg, include=sel.get("include"), exclude=sel.get("exclude"))
        trial.train()
        with torch.no_grad():
            trial(x)
    except (ConfigError, PatternError) as e:
        raise type(e)(f"quant_noise: {e}") from None


def _check_prune_steps(recipe, n_batches) -> None:
    """The pruning schedule must end within the fine-tuning run (one st.step per optimizer step)."""
    cfg = getattr(recipe, "prune", None)
    if cfg is None or cfg.total_steps == 0 or n_batches is None:
        return
    from .train import TrainConfig
    epochs = (recipe.finetune or {}).get("epochs", TrainConfig.epochs)
    if cfg.total_steps > epochs * n_batches:
        raise ConfigError(f"prune: total_steps={cfg.total_steps} but finetune runs {epochs} epochs x "
                          f"{n_batches} batches = {epochs * n_batches} steps: the schedule would not reach "
                          "its final sparsity")


def preflight(model: torch.nn.Module, recipe, train_batches) -> None:
    """All model-dependent checks; the global RNG states are left exactly as they were."""
    check_export_dependencies(recipe.export)
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    try:
        if getattr(recipe, "quant_noise", None) is not None and recipe.noise_select.get("stage") == "train":
            check_quant_noise(copy.deepcopy(model), recipe, _first_input(train_batches), "train")
        trial = check_compression(model, recipe, train_batches)
        if getattr(recipe, "ipq", None) is not None:
            check_ipq(trial if trial is not None else copy.deepcopy(model), recipe, _first_input(train_batches))
    finally:
        torch.set_rng_state(state[0])
        random.setstate(state[1])
        np.random.set_state(state[2])
