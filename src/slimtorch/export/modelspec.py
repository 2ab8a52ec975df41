"""How a packed file names its float architecture (``build`` in the header) and example inputs.

{"source": "zoo", "name": "mnist_cnn", "kwargs": {...}}  slimtorch.models.build_model (zoo names or
    "package.module:factory" import paths);
{"source": "hf", "config": {...}}  a transformers model rebuilt from its config (no download)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def zoo_spec(name: str, **kwargs) -> dict:
    return {"source": "zoo", "name": name, "kwargs": kwargs}


def build_spec(model: nn.Module) -> dict | None:
    """A build record for ``model``: HF models from their config, zoo models if tagged by
    ``build_model`` (attribute ``_slim_build``); None when unknown."""
    spec = getattr(model, "_slim_build", None)
    if spec:
        return spec
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_diff_dict"):
        d = cfg.to_diff_dict()
        d.setdefault("model_type", cfg.model_type)
        return {"source": "hf", "class": type(model).__name__, "config": d}
    return None


def build_from_spec(spec: dict) -> nn.Module:
    src = spec.get("source")
    if src == "zoo":
        from ..models import build_model
        m = build_model(spec["name"], **spec.get("kwargs", {}))
    elif src == "hf":
        import transformers
        cfg = dict(spec["config"])
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        cls = getattr(transformers, spec.get("class", ""), None) or transformers.AutoModel
        m = (cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config))
    else:
        raise ConfigError(f"unknown model build record {spec!r}")
    m._slim_build = spec
    return m.eval()


def example_inputs(model: nn.Module, spec: dict | None, batch: int = 1, seq: int = 128):
    """Inputs for export and benchmarks: a tensor for zoo models (their registered input shape),
    a dict (input_ids, attention_mask) for HF encoders."""
    spec = spec or {}
    if spec.get("source") == "hf" or getattr(model, "config", None) is not None:
        vocab = getattr(model.config, "vocab_size", 1000)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(5, vocab, (batch, seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.int64)}
    if spec.get("source") == "zoo":
        from ..models import model_spec
        shape = model_spec(spec["name"]).input_shape if ":" not in spec["name"] else None
        if shape:
            return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    raise ConfigError("cannot make example inputs for this model: give --input-shape")


class HFEncoder(nn.Module):
    """(input_ids, attention_mask) -> last_hidden_state: the exportable face of an HF encoder."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.training = model.training

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
