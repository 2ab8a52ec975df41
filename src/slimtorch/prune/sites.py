"""Where heads and FFN neurons live: the attention and feed-forward blocks slimtorch can prune by
head / neuron and ``shrink_`` can rebuild smaller (the structured variants of movement pruning,
Sanh, Wolf & Rush 2020, papers.md Sec. 5; head pruning as HF's ``prune_heads``).

Known attention (``heads``):
    nn.MultiheadAttention (alone or in nn.TransformerEncoderLayer / DecoderLayer), split first into
        q/k/v_proj Linears (quant/mha.py): rows of q/k/v_proj, columns of out_proj, head_dim each;
    HF BERT-style attention (BertAttention and its relatives: a module with ``self.query / key /
        value`` Linears, ``self.num_attention_heads``, ``self.attention_head_size`` and
        ``output.dense``): rows of query/key/value, columns of output.dense.
Known feed-forward blocks (``neurons``):
    nn.TransformerEncoderLayer / DecoderLayer: rows of linear1, columns of linear2;
    HF BERT-style layers (``intermediate.dense`` then ``output.dense``).
Any other module whose class name says attention is refused with its type named."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from ..attach import _as_list
from ..errors import ConfigError, PatternError

KNOWN_ATTENTION = ("nn.MultiheadAttention", "HF BERT-style attention (self.query/key/value + output.dense)")


@dataclass
class Site:
    """One attention block (``kind`` "heads") or FFN (``kind`` "neurons"): ``n`` groups of ``size``
    units along dim 0 of the ``rows`` layers and dim 1 of the ``cols`` layers (qualified names)."""
    kind: str
    name: str
    owner: nn.Module
    n: int
    size: int
    rows: list = field(default_factory=list)
    cols: list = field(default_factory=list)
    style: str = ""

    @property
    def layers(self) -> list:
        return self.rows + self.cols


def _j(*parts) -> str:
    return ".".join(p for p in parts if p)


def _lin(m, *path):
    for p in path:
        m = getattr(m, p, None)
    return m if isinstance(m, nn.Linear) else None


def _hf_attention(m) -> bool:
    s = getattr(m, "self", None)
    return (s is not None and all(_lin(s, p) for p in ("query", "key", "value")) and _lin(m, "output", "dense")
            and isinstance(getattr(s, "num_attention_heads", None), int)
            and isinstance(getattr(s, "attention_head_size", None), int))


def _hf_ffn(m) -> bool:
    return _lin(m, "intermediate", "dense") is not None and _lin(m, "output", "dense") is not None \
        and not _hf_attention(m)


def head_sites(model: nn.Module) -> list[Site]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            from ..quant.mha import is_split
            if not is_split(m):
                continue
            out.append(Site("heads", name, m, m.num_heads, m.head_dim,
                            [_j(name, p) for p in ("q_proj", "k_proj", "v_proj")], [_j(name, "out_proj")], "mha"))
        elif _hf_attention(m):
            s = m.self
            out.append(Site("heads", name, m, s.num_attention_heads, s.attention_head_size,
                            [_j(name, "self", p) for p in ("query", "key", "value")], [_j(name, "output.dense")],
                            "hf"))
    return out


def neuron_sites(model: nn.Module) -> list[Site]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            out.append(Site("neurons", name, m, m.linear1.out_features, 1, [_j(name, "linear1")],
                            [_j(name, "linear2")], "torch"))
        elif _hf_ffn(m):
            out.append(Site("neurons", name, m, m.intermediate.dense.out_features, 1,
                            [_j(name, "intermediate.dense")], [_j(name, "output.dense")], "hf"))
    return out


def unknown_attention(model: nn.Module, sites: list[Site]) -> list[tuple[str, str]]:
    """(name, class name) of modules whose class name contains "attention" but that are neither a
    known site nor inside one."""
    owners = [s.name for s in sites]
    inside = lambda n: any(n == o or n.startswith(o + ".") for o in owners)  # noqa: E731
    return [(n, type(m).__name__) for n, m in model.named_modules()
            if "attention" in type(m).__name__.lower() and not inside(n)
            and not isinstance(m, nn.MultiheadAttention)          # known: split on demand
            and not any(inside(c) for c, _ in m.named_modules(prefix=n))
            and any(isinstance(c, nn.Linear) for c in m.modules())]


def unknown_attention_error(name: str, cls: str, what: str) -> ConfigError:
    return ConfigError(f"{what}: attention module {name!r} is a {cls}, which slimtorch cannot prune by "
                       f"heads or shrink; known attention: {'; '.join(KNOWN_ATTENTION)}")


def find_sites(model: nn.Module, kind: str, include=None, exclude=None) -> list[Site]:
    """The head (``kind`` "heads") or neuron sites all of whose layers the include / exclude globs
    select (globs on the Linear names, as ``prune_``). Splits nn.MultiheadAttention first for heads.
    Raises ConfigError naming the type of any unknown attention module the globs touch."""
    if kind == "heads":
        from ..quant.mha import split_all_
        split_all_(model)
    sites = head_sites(model) if kind == "heads" else neuron_sites(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    inc, exc = _as_list(include), _as_list(exclude)
    for pat in inc + exc:
        if not any(fnmatch.fnmatchcase(n, pat) for n in linears):
            raise PatternError(f"pattern {pat!r} matches no Linear layer")
    chosen = {n for n in linears if (not inc or any(fnmatch.fnmatchcase(n, p) for p in inc))
              and not any(fnmatch.fnmatchcase(n, p) for p in exc)}
    if kind == "heads":
        for name, cls in unknown_attention(model, head_sites(model)):
            if any(_j(name, c) in chosen for c, x in model.get_submodule(name).named_modules()
                   if isinstance(x, nn.Linear)):
                raise unknown_attention_error(name, cls, "structure='heads'")
    picked = [s for s in sites if all(n in chosen for n in s.layers)]
    if not picked:
        what = ("attention blocks (" + "; ".join(KNOWN_ATTENTION) + ")" if kind == "heads" else
                "feed-forward blocks (nn.TransformerEncoderLayer / DecoderLayer linear1/linear2, HF "
                "BERT-style intermediate.dense/output.dense)")
        raise ConfigError(f"structure={kind!r}: no {what} in {type(model).__name__}"
                          + (f" selected by include={inc} exclude={exc}" if inc or exc else ""))
    return picked


__all__ = ["Site", "find_sites", "head_sites", "neuron_sites", "unknown_attention", "KNOWN_ATTENTION"]
