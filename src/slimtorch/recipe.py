"""Recipes: the YAML/JSON document ``slimtorch run`` executes. One validation pass before any work:
every section is a mapping, every key known, every value typed strictly (schema.py: pydantic v2 in
strict mode, from the annotations of the section dataclasses below and of the method configs) and
range-checked; dataset options and model kwargs are checked against the loader's / factory's own
signature. What depends on the model is checked by ``pipeline.preflight`` right after it is built.

    seed: 0
    data:     {name: digits, eval_batch_size: 256, options: {}}   # batch_size: in train/finetune
    model:    {name: digits_cnn, kwargs: {}, checkpoint: null}   # zoo name or "pkg.module:factory"
    train:    {epochs: 10, lr: 0.002, ...}                       # float training (skipped with checkpoint)
    search:   {method: hawq, bits: [2, 4, 8], budget: avg_bits, target: 3}   # optional: a bit plan
    prune:    {method: hard_movement, remaining: 0.1, total_steps: 200, warmup_steps: 20,
               structure: unstructured, include: null, exclude: null}    # optional, needs compress:
               # masks first (W' = Q(W * M)), the schedule runs during finetune (st.step each step)
    quant_noise: {p: 0.1, mode: pq, block_size: null, bits: 8, embeddings: true,   # optional (pq/noise.py):
               include: null, exclude: null, stage: null}   # Quant-Noise during one training stage:
               # "train" (the float training) or "finetune" (after compress); null: train when the recipe
               # trains the float model, else finetune. Attached before that stage, removed after it.
    compress: {method: lsq+, w_bits: 4, a_bits: 4, include: null, exclude: null,
               plan: null, calibrate_batches: 8,     # method uhlich: learned bits + budget penalty
               fold_bn: false, reestimate_bn: null}  # BN folded before quantize_; BN stats re-estimated after
    finetune: {epochs: 3, lr: 0.0005, ...}                       # QAT after compress
    ipq:      {stages: [[conv*], [fc*]], n_centroids: 256, block_size: null, exclude: null,  # optional:
               finetune: {epochs: 1, lr: 0.001}, steps: null, centroids_lr: null}   # iterative PQ
               # (recipe_ipq.py): after the float training (and compress / finetune), stage by stage
    export:   {path: model.slim, onnx: null, onnx_kernels: qdq,   # packed file (+ ONNX) in --out
               onnx_fuse_skip_layernorm: false}
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from .config import config_from_dict, load_yaml
from .errors import ConfigError
from .schema import build, check_call, check_mapping

SECTIONS = ("name", "description", "seed", "data", "model", "train", "search", "prune", "quant_noise", "compress",
            "finetune", "ipq", "export")
Globs = Optional[Union[str, tuple[str, ...]]]
PlanEntry = Union[int, dict[str, Optional[int]]]


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


@dataclass(frozen=True)
class DataSection:
    name: str
    eval_batch_size: int = 256
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        _need(self.name != "", "name must not be empty")
        _need(self.eval_batch_size >= 1, f"eval_batch_size={self.eval_batch_size}: expected an integer >= 1")


@dataclass(frozen=True)
class ModelSection:
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None

    def __post_init__(self):
        _need(self.name != "", "name must not be empty")


@dataclass(frozen=True)
class SelectSection:
    """The compress keys that choose layers and calibration (the rest is the method config)."""
    include: Globs = None
    exclude: Globs = None
    plan: Optional[dict[str, PlanEntry]] = None
    calibrate_batches: int = 8
    fold_bn: bool = False                 # fold BatchNorm into its conv/linear before quantize_
    reestimate_bn: Optional[int] = None   # batches to re-estimate BN statistics after fine-tuning

    def __post_init__(self):
        from .quant.quantizer import check_bits

        _need(self.calibrate_batches >= 1,
              f"calibrate_batches={self.calibrate_batches}: expected an integer >= 1")
        _need(self.reestimate_bn is None or self.reestimate_bn >= 1,
              f"reestimate_bn={self.reestimate_bn}: expected an integer >= 1 or null")
        for name, entry in (self.plan or {}).items():
            bits = {"w_bits": entry} if isinstance(entry, int) else entry
            bad = sorted(set(bits) - {"w_bits", "a_bits"})
            _need(not bad, f"plan[{name!r}]: unknown key(s) {bad}; use w_bits, a_bits")
            for k, b in bits.items():
                if b is not None or k == "w_bits":
                    check_bits(b, f"plan[{name!r}].{k}")


@dataclass(frozen=True)
class PruneSelect:
    """The prune keys that choose layers (the rest is the pruning config: magnitude,
    hard_movement or soft_movement, Sanh, Wolf & Rush 2020)."""
    include: Globs = None
    exclude: Globs = None


@dataclass(frozen=True)
class NoiseSelect:
    """The quant_noise keys that are not the QuantNoise config: layers and the training stage."""
    include: Globs = None
    exclude: Globs = None
    stage: Optional[Literal["train", "finetune"]] = None


@dataclass(frozen=True)
class ExportSection:
    path: str = "model.slim"
    onnx: Optional[str] = None
    onnx_kernels: Literal["qdq", "ort"] = "qdq"
    onnx_fuse_skip_layernorm: bool = False

    def __post_init__(self):
        for key in ("path", "onnx"):
            v = getattr(self, key)
            _need(v is None or (v != "" and not Path(v).is_absolute() and ".." not in Path(v).parts),
                  f"{key}={v!r}: expected a file name inside the output folder")


@dataclass
class Recipe:
    name: str
    seed: int
    data: dict
    model: dict
    train: dict | None
    compress: object | None          # a method config (LSQ, LSQPlus, Uhlich, ...)
    select: dict = field(default_factory=dict)   # include / exclude / plan / calibrate_batches / fold_bn / ...
    finetune: dict | None = None
    export: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)   # the document as read
    search: object | None = None     # a search config (HAWQConfig) producing the plan
    prune: object | None = None      # a pruning config (Magnitude, HardMovement, SoftMovement)
    prune_select: dict = field(default_factory=dict)   # include / exclude of the prune section
    quant_noise: object | None = None   # a QuantNoise config (pq/noise_configs.py)
    noise_select: dict = field(default_factory=dict)   # include / exclude / stage (resolved) of quant_noise
    ipq: dict | None = None          # stages [(patterns, PQ)], exclude, finetune, steps (recipe_ipq.py)


def _given(section_cls, doc: dict, key: str, where: str) -> dict | None:
    """A validated section as the dict of the keys the recipe gave (None when absent)."""
    if doc.get(key) is None:
        return None
    obj = build(section_cls, doc[key], f"{where}: {key}")
    return {k: getattr(obj, k) for k in doc[key]}


def _factory_checks(data: dict, model: dict, where: str) -> None:
    """Dataset options and model kwargs against the loader's / factory's signature (names and types)."""
    from .data.datasets import _REGISTRY, _key
    from .models.zoo import _import_factory, model_spec

    loader = _REGISTRY.get(_key(data["name"]))
    if loader is None:
        from .data import list_datasets
        from .errors import DataError
        raise DataError(f"{where}: data.name {data['name']!r} is not a known dataset; known: "
                          f"{', '.join(list_datasets())}")
    data["options"] = check_call(loader, data.get("options", {}), f"{where}: data.options")
    name = model["name"]
    factory = _import_factory(name) if ":" in name else model_spec(name).factory
    model["kwargs"] = check_call(factory, model.get("kwargs", {}), f"{where}: model.kwargs")


def parse_recipe(doc: dict, name: str = "recipe") -> Recipe:
    """Validate a whole recipe document (a dict) and build the configs it names."""
    from .train import TrainConfig

    check_mapping(doc, name, f"a mapping of sections {list(SECTIONS)}")
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {unknown}; allowed keys: {sorted(SECTIONS)}")
    for key in ("name", "description"):
        _need(doc.get(key) is None or isinstance(doc[key], str), f"{name}: {key} must be a string")
    seed = doc.get("seed", 0)
    _need(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0,
          f"{name}: seed must be an integer >= 0, got {seed!r}")
    for key in ("data", "model"):
        _need(doc.get(key) is not None, f"{name}: missing section '{key}'")
    data = _given(DataSection, doc, "data", name)
    model = _given(ModelSection, doc, "model", name)
    _factory_checks(data, model, name)
    train = _given(TrainConfig, doc, "train", name)
    finetune = _given(TrainConfig, doc, "finetune", name)
    compress, select = None, {}
    if doc.get("compress") is not None:
        comp = dict(check_mapping(doc["compress"], f"{name}: compress"))
        sel_keys = {f.name for f in dataclasses.fields(SelectSection)}
        given = {k: comp.pop(k) for k in list(comp) if k in sel_keys}
        sel = build(SelectSection, given, f"{name}: compress")
        select = {k: getattr(sel, k) for k in given}
        compress = config_from_dict(comp, where=f"{name}: compress")
    elif finetune is not None:
        raise ConfigError(f"{name}: a 'finetune' section needs a 'compress' section (it fine-tunes "
                          "the compressed model)")
    search = None
    if doc.get("search") is not None:
        search = config_from_dict(check_mapping(doc["search"], f"{name}: search"), where=f"{name}: search")
        if compress is None:
            raise ConfigError(f"{name}: a 'search' section needs a 'compress' section to apply its plan")
        if select.get("plan") is not None:
            raise ConfigError(f"{name}: give either compress.plan or a search section, not both")
    prune, prune_select = _prune_section(doc, name, compress, finetune)
    export = _given(ExportSection, doc, "export", name) or {}
    if train is None and not model.get("checkpoint"):
        raise ConfigError(f"{name}: give either a 'train' section or model.checkpoint (float weights)")
    noise, noise_select = _quant_noise_section(doc, name, train if not model.get("checkpoint") else None, finetune)
    from .recipe_ipq import parse_ipq_section
    ipq = parse_ipq_section(doc, name)
    return Recipe(doc.get("name") or name, seed, data, model, train, compress, select, finetune, export,
                  doc, search, prune, prune_select, noise, noise_select, ipq)


def _quant_noise_section(doc: dict, name: str, train, finetune) -> tuple:
    """(QuantNoise config, {include, exclude, stage}) of the ``quant_noise`` section, or (None, {}).
    ``method`` may be left out (it can only be quant_noise); ``stage`` is resolved here."""
    if doc.get("quant_noise") is None:
        return None, {}
    where = f"{name}: quant_noise"
    body = dict(check_mapping(doc["quant_noise"], where))
    given = {k: body.pop(k) for k in list(body) if k in ("include", "exclude", "stage")}
    sel = build(NoiseSelect, given, where)
    if body.setdefault("method", "quant_noise") != "quant_noise":
        raise ConfigError(f"{where}: method {body['method']!r}; this section takes method quant_noise only")
    cfg = config_from_dict(body, where=where)
    stage = sel.stage or ("train" if train is not None else "finetune")
    if stage == "train" and train is None:
        raise ConfigError(f"{where}: stage 'train' needs a 'train' section that runs (no model.checkpoint)")
    if stage == "finetune" and finetune is None:
        raise ConfigError(f"{where}: stage 'finetune' needs a 'finetune' section (and 'compress')")
    if stage == "train" and cfg.bits == "layer":
        raise ConfigError(f"{where}: bits='layer' reads the layers' weight quantizers, which the float "
                          "training stage does not have; use stage 'finetune' or bits=N")
    out = {k: getattr(sel, k) for k in given if k != "stage"}
    return cfg, {**out, "stage": stage}


def _prune_section(doc: dict, name: str, compress, finetune) -> tuple:
    """(pruning config, {include, exclude}) of the ``prune`` section, or (None, {})."""
    from .prune import PruneConfig

    if doc.get("prune") is None:
        return None, {}
    where = f"{name}: prune"
    body = dict(check_mapping(doc["prune"], where))
    given = {k: body.pop(k) for k in list(body) if k in ("include", "exclude")}
    sel = build(PruneSelect, given, where)
    from .config import _CONFIGS
    cls = _CONFIGS.get(body.get("method")) if isinstance(body.get("method"), str) else None
    if cls is not None and not issubclass(cls, PruneConfig):
        raise ConfigError(f"{where}: method {body['method']!r} is not a pruning method; use magnitude, "
                          "hard_movement or soft_movement")
    cfg = config_from_dict(body, where=where)
    if not isinstance(cfg, PruneConfig):
        raise ConfigError(f"{where}: method {type(cfg).method!r} is not a pruning method; use magnitude, "
                          "hard_movement or soft_movement")
    if compress is None:
        raise ConfigError(f"{where}: a 'prune' section needs a 'compress' section (the packed file stores "
                          "masks with the quantized codes of the kept weights)")
    if cfg.total_steps > 0 and finetune is None:
        raise ConfigError(f"{where}: total_steps={cfg.total_steps} needs a 'finetune' section (the "
                          "schedule advances once per fine-tuning step)")
    return cfg, {k: getattr(sel, k) for k in given}


def load_recipe(path) -> Recipe:
    return parse_recipe(load_yaml(path), name=Path(path).name)
