"""Recipes: the YAML/JSON document ``slimtorch run`` executes. Every section and key is validated
up front, and an unknown key is an error that names it and lists the allowed ones.

    seed: 0
    data:     {name: digits, eval_batch_size: 256, options: {}}   # batch_size: in train/finetune
    model:    {name: digits_cnn, kwargs: {}, checkpoint: null}   # zoo name or "pkg.module:factory"
    train:    {epochs: 10, lr: 0.002, ...}                       # float training (skipped with checkpoint)
    search:   {method: hawq, bits: [2, 4, 8], budget: avg_bits, target: 3}   # optional: a bit plan
    compress: {method: lsq+, w_bits: 4, a_bits: 4, include: null, exclude: null,
               plan: null, calibrate_batches: 8}     # method uhlich: learned bits + budget penalty
    finetune: {epochs: 3, lr: 0.0005, ...}                       # QAT after compress
    export:   {path: model.slim, onnx: null, onnx_kernels: qdq,   # packed file (+ ONNX) in --out
               onnx_fuse_skip_layernorm: false}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import check_keys, config_from_dict, load_yaml
from .errors import ConfigError

SECTIONS = {"seed", "data", "model", "train", "search", "compress", "finetune", "export", "name",
            "description"}
DATA_KEYS = {"name", "eval_batch_size", "options"}
MODEL_KEYS = {"name", "kwargs", "checkpoint"}
COMPRESS_SELECT = {"include", "exclude", "plan", "calibrate_batches"}
EXPORT_KEYS = {"path", "onnx", "onnx_kernels", "onnx_fuse_skip_layernorm"}


@dataclass
class Recipe:
    name: str
    seed: int
    data: dict
    model: dict
    train: dict | None
    compress: object | None          # a method config (LSQ, LSQPlus, Uhlich, ...)
    select: dict = field(default_factory=dict)   # include / exclude / plan / calibrate_batches
    finetune: dict | None = None
    export: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)   # the document as read
    search: object | None = None     # a search config (HAWQConfig) producing the plan


def _section(doc, key, allowed, required=False):
    if key not in doc or doc[key] is None:
        if required:
            raise ConfigError(f"recipe: missing section '{key}'")
        return None
    check_keys(doc[key], allowed, f"recipe section '{key}'")
    return dict(doc[key])


def parse_recipe(doc: dict, name: str = "recipe") -> Recipe:
    """Validate a recipe document (a dict) and build the method config it names."""
    from .train import TrainConfig  # validates train/finetune keys and values
    import dataclasses

    if not isinstance(doc, dict):
        raise ConfigError(f"{name}: a recipe is a mapping of sections {sorted(SECTIONS)}")
    check_keys(doc, SECTIONS, name)
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{name}: seed must be an integer, got {seed!r}")
    data = _section(doc, "data", DATA_KEYS, required=True)
    if "name" not in data:
        raise ConfigError(f"{name}: data.name is required")
    model = _section(doc, "model", MODEL_KEYS, required=True)
    if "name" not in model:
        raise ConfigError(f"{name}: model.name is required")
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    train = _section(doc, "train", train_keys)
    finetune = _section(doc, "finetune", train_keys)
    for key, sec in (("train", train), ("finetune", finetune)):
        if sec is not None:
            try:
                TrainConfig(**sec)
            except ConfigError as e:
                raise ConfigError(f"{name}: {key}: {e}") from None
    compress, select = None, {}
    if doc.get("compress") is not None:
        comp = dict(doc["compress"])
        select = {k: comp.pop(k) for k in list(comp) if k in COMPRESS_SELECT}
        compress = config_from_dict(comp, where=f"{name}: compress")
    search = None
    if doc.get("search") is not None:
        search = config_from_dict(dict(doc["search"]), where=f"{name}: search")
        if compress is None:
            raise ConfigError(f"{name}: a 'search' section needs a 'compress' section to apply its plan")
        if select.get("plan") is not None:
            raise ConfigError(f"{name}: give either compress.plan or a search section, not both")
    export = _section(doc, "export", EXPORT_KEYS) or {}
    if export.get("onnx_kernels", "qdq") not in ("qdq", "ort"):
        raise ConfigError(f"{name}: export.onnx_kernels must be 'qdq' or 'ort', got {export['onnx_kernels']!r}")
    if not isinstance(export.get("onnx_fuse_skip_layernorm", False), bool):
        raise ConfigError(f"{name}: export.onnx_fuse_skip_layernorm must be true or false, "
                          f"got {export['onnx_fuse_skip_layernorm']!r}")
    if train is None and not model.get("checkpoint"):
        raise ConfigError(f"{name}: give either a 'train' section or model.checkpoint (float weights)")
    return Recipe(doc.get("name", name), seed, data, model, train, compress, select, finetune, export, doc,
                  search)


def load_recipe(path) -> Recipe:
    return parse_recipe(load_yaml(path), name=Path(path).name)
