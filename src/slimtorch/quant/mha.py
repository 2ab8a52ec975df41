"""``nn.MultiheadAttention`` with its projections as ``nn.Linear`` modules, so every slimtorch
transform (weight parametrizations, input-quantizer pre-hooks, packing, int8 kernels) applies.

torch's MHA keeps ``in_proj_weight`` (or ``q/k/v_proj_weight``) as bare parameters and calls
``out_proj.weight`` functionally, so hooks on ``out_proj`` never run. :func:`split_projections_`
moves those tensors (same values) into child Linears ``q_proj``, ``k_proj``, ``v_proj`` (bias: the
slices of ``in_proj_bias``) and swaps the instance to a subclass whose forward calls them as modules
around torch's attention (attention_core.py): with quantizers off, outputs equal torch's. The
object stays where it is in the user's graph; ``in_proj_weight`` / ``in_proj_bias`` remain readable
(concatenated views for torch's checks). Its state-dict keys change (``...q_proj.weight``), so
packed files record the converted modules and ``load_packed`` converts a fresh model the same way.

torch's fast paths (``_native_multi_head_attention``, ``_transformer_encoder_layer_fwd`` and
TransformerEncoder's nested-tensor conversion) would bypass these modules: the converted forward
never takes the first, a forward pre-hook on the converted module blocks the second (torch skips it
when any submodule has hooks) and :func:`block_fast_paths_` turns the third off."""
from __future__ import annotations

import torch
from torch import nn

from .attention_core import attention

PROJ = ("q_proj", "k_proj", "v_proj")
_CLASSES: dict[type, type] = {}


def _fastpath_guard(module, args):
    """Present only so that torch's TransformerEncoderLayer fast path (skipped when a submodule has
    hooks) cannot bypass the projection modules; changes nothing."""
    return None


def _slim_forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                  average_attn_weights=True, is_causal=False):
    """MultiheadAttention.forward (slow path) with the projections run as modules."""
    import torch.nn.functional as F
    batched = query.dim() == 3
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                  target_type=query.dtype, check_other=False)
    F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
    if key.shape[:-1] != value.shape[:-1]:
        raise AssertionError(f"key's sequence and batch dims {key.shape[:-1]} do not match value's "
                             f"{value.shape[:-1]}")
    q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
    if self.batch_first and batched:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    out, weights = attention(self, q, k, v, key_padding_mask, need_weights, attn_mask,
                             average_attn_weights, is_causal)
    if self.batch_first and batched:
        out = out.transpose(0, 1)
    return self.out_proj(out), weights


def _cat(self, name):
    """in_proj_weight / in_proj_bias as torch's checks read them (None once a projection module
    no longer has the tensor, e.g. after the int8 runtime replaced it)."""
    parts = [getattr(getattr(self, p), name, None) for p in PROJ]
    return None if any(not isinstance(t, torch.Tensor) for t in parts) else torch.cat(parts)


def _slim_class(base: type) -> type:
    if base not in _CLASSES:
        same = lambda f: property(lambda self: f(self) if self._qkv_same_embed_dim else None)  # noqa: E731
        sep = lambda p: property(lambda self: None if self._qkv_same_embed_dim else getattr(self, p).weight)  # noqa: E731
        _CLASSES[base] = type(f"Slim{base.__name__}", (base,), {
            "forward": _slim_forward, "_slim_split": True,
            "in_proj_weight": same(lambda self: _cat(self, "weight")),
            "in_proj_bias": property(lambda self: _cat(self, "bias")),
            "q_proj_weight": sep("q_proj"), "k_proj_weight": sep("k_proj"), "v_proj_weight": sep("v_proj"),
            "__doc__": f"{base.__name__} whose projections are nn.Linear modules (slimtorch)."})
    return _CLASSES[base]


def is_split(module: nn.Module) -> bool:
    return getattr(type(module), "_slim_split", False)


@torch.no_grad()
def split_projections_(mha: nn.MultiheadAttention) -> nn.MultiheadAttention:
    """Move ``mha``'s input projections into child Linears q_proj/k_proj/v_proj (in place, same
    values; a no-op when already done) and give it the forward that calls them."""
    if is_split(mha):
        return mha
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        weights = mha.in_proj_weight.chunk(3)
    else:
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    bias = mha.in_proj_bias
    biases = bias.chunk(3) if bias is not None else (None,) * 3
    grad = mha.in_proj_weight.requires_grad if mha._qkv_same_embed_dim else mha.q_proj_weight.requires_grad
    made = []
    for w, b in zip(weights, biases):
        lin = nn.Linear(w.shape[1], e, bias=b is not None, device=w.device, dtype=w.dtype)
        lin.weight = nn.Parameter(w.detach().clone(), requires_grad=grad)
        if b is not None:
            lin.bias = nn.Parameter(b.detach().clone(), requires_grad=bias.requires_grad)
        made.append(lin)
    for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
        mha._parameters.pop(name, None)
    for name, lin in zip(PROJ, made):
        mha.add_module(name, lin)
    mha._modules = {k: mha._modules[k] for k in (*PROJ, *[k for k in mha._modules if k not in PROJ])}
    mha.__class__ = _slim_class(type(mha))
    mha.register_forward_pre_hook(_fastpath_guard)
    return mha


def split_all_(model: nn.Module, names=None) -> list[str]:
    """Split every MultiheadAttention in ``model`` (or those named in ``names``); returns the names
    of the modules that are split now (including ones split before)."""
    out = []
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.MultiheadAttention) and (names is None or name in names):
            split_projections_(m)
            out.append(name)
    if out:
        block_fast_paths_(model)
    return out


def split_selected_(model, include, exclude) -> list[str]:
    """Split the MultiheadAttention modules one of whose projections the globs select."""
    import fnmatch

    from ..attach import _as_list
    inc, exc = _as_list(include), _as_list(exclude)
    chosen = lambda n: ((not inc or any(fnmatch.fnmatchcase(n, p) for p in inc))  # noqa: E731
                        and not any(fnmatch.fnmatchcase(n, p) for p in exc))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
             and any(chosen(f"{n}.{p}" if n else p) for p in PROJ + ("out_proj",))]
    return split_all_(model, names) if names else []


def block_fast_paths_(model: nn.Module) -> None:
    """Turn off TransformerEncoder's nested-tensor fast path where a layer holds a split MHA (the
    converted layers cannot take nested tensors; torch checks ``use_nested_tensor`` first)."""
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(is_split(x) for x in m.modules()):
            m.use_nested_tensor = False


def _spec(q):
    try:
        return q.spec()
    except NotImplementedError:
        return None


def share_attention_inputs_(model: nn.Module) -> list[list[str]]:
    """Give the projections of a split MHA that torch's transformer layers feed the same tensor one
    input quantizer (self_attn(x, x, x): q/k/v; a decoder's multihead_attn(x, mem, mem): k/v), when
    their quantizers have the same spec. Returns the groups shared."""
    from ..attach import input_quantizer, set_input_quantizer
    groups = []
    for lname, layer in model.named_modules():
        if not isinstance(layer, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            continue
        for attr, members in (("self_attn", PROJ), ("multihead_attn", PROJ[1:])):
            mha = getattr(layer, attr, None)
            if mha is None or not is_split(mha):
                continue
            qs = [input_quantizer(getattr(mha, p)) for p in members]
            if any(q is None for q in qs) or len({repr(_spec(q)) for q in qs}) != 1 or _spec(qs[0]) is None:
                continue
            for p in members[1:]:
                set_input_quantizer(getattr(mha, p), qs[0])
            prefix = f"{lname}.{attr}." if lname else f"{attr}."
            groups.append([prefix + p for p in members])
    return groups
