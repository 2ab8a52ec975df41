"""Fused int8 self-attention for the ONNX export (``export_onnx(kernels="ort")``).

A self-attention block whose query/key/value Linear layers read one shared input quantizer
(``share_input_quantizers``) with 8-bit affine weights is exported as one com.microsoft QAttention
node: the uint8 input codes, the Q|K|V integer weights concatenated to [in, 3 * out] with per-column
steps, the biases, and a key-padding mask. onnxruntime then runs the integer QKV GEMM and the
attention (QK^T / sqrt(d) + mask, softmax, x V) in one kernel instead of ~15 float nodes.

Which modules qualify is decided by behaviour, not by class: a module with ``query``, ``key``,
``value`` children, ``num_attention_heads`` and ``attention_head_size`` (the layout HF's BERT-family
self-attention uses), not causal, whose mask on the example batch is a key-padding mask (one row
for every query), is replaced only if :class:`QAttentionBlock`'s PyTorch path reproduces the
module's own output on the example batch, with and without a padding mask."""
from __future__ import annotations

import math

import torch
from torch import nn

from .onnx_export import layer_levels


class QAttentionBlock(nn.Module):
    """Stand-in for a quantized self-attention module (see the module docstring)."""

    def __init__(self, module: nn.Module, act, levels: list, heads: int):
        super().__init__()
        self.act, self.heads = act, heads
        q, k, v = (getattr(module, n) for n in ("query", "key", "value"))
        self.out_features = [m.out_features for m in (q, k, v)]
        w = torch.cat([lv.to(torch.int8).t() for lv, _ in levels], dim=1).contiguous()   # [in, 3*out]
        s = torch.cat([sc.reshape(-1).expand(n) for (_, sc), n in zip(levels, self.out_features)])
        b = torch.cat([m.bias.detach() if m.bias is not None
                       else torch.zeros(m.out_features, device=m.weight.device) for m in (q, k, v)])
        self.register_buffer("w_int", w)
        self.register_buffer("w_scale", s.contiguous())
        self.register_buffer("bias", b.float())

    @staticmethod
    def additive(mask, dtype):
        """HF passes either an additive float mask (0 = attend) or a bool mask (True = attend)."""
        if mask is None or mask.is_floating_point():
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)

    def _torch_forward(self, hidden, mask):
        mask = self.additive(mask, hidden.dtype)
        x = self.act(hidden)
        qkv = x @ (self.w_int.float() * self.w_scale) + self.bias
        b, t, _ = hidden.shape
        q, k, v = (y.reshape(b, t, self.heads, -1).transpose(1, 2) for y in qkv.split(self.out_features, -1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores + mask
        out = torch.softmax(scores, -1) @ v
        return out.transpose(1, 2).reshape(b, t, -1)

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        if not torch.onnx.is_in_onnx_export():
            return self._torch_forward(hidden_states, attention_mask), None
        codes, zp = self.act.codes(hidden_states)
        mask = None
        if attention_mask is not None:   # [B, 1, T, T] key-padding mask -> [B, T], 1 = attend
            row = attention_mask[:, 0, 0, :]
            mask = (row if row.dtype == torch.bool else row == 0).to(torch.int32)
        out = torch.onnx.ops.symbolic(
            "com.microsoft::QAttention",
            (codes, self.w_int, self.bias, self.act.scale, self.w_scale, mask,
             torch.tensor(zp, dtype=torch.uint8)),
            {"num_heads": self.heads}, dtype=hidden_states.dtype,
            shape=(*hidden_states.shape[:-1], self.w_int.shape[1] // 3), version=1)
        return out, None


def attention_blocks(model: nn.Module, layers: dict, acts: dict) -> dict:
    """{name: (module, act, levels, heads)} of the self-attention modules that could be fused:
    q/k/v quantized, one shared activation stand-in without a float offset, 8-bit affine weights."""
    found = {}
    for name, m in model.named_modules():
        kids = [getattr(m, n, None) for n in ("query", "key", "value")]
        heads = getattr(m, "num_attention_heads", None)
        if not all(isinstance(c, nn.Linear) for c in kids) or not isinstance(heads, int):
            continue
        if getattr(m, "is_causal", False) or getattr(m, "is_decoder", False):
            continue                                   # QAttention here: key-padding masks only
        names = [f"{name}.{n}" if name else n for n in ("query", "key", "value")]
        if not all(n in layers for n in names):
            continue
        if any(layers[n][1] is None for n in names):
            continue
        shared = {id(acts[id(layers[n][1])]) for n in names}   # one export module = one quantizer
        if len(shared) != 1:
            continue
        act = acts[id(layers[names[0]][1])]
        if act.offset is not None:
            continue
        levels = [layer_levels(c, layers[n][0]) for n, c in zip(names, kids)]
        if any(lv is None or lv[0].dtype != torch.int8 for lv in levels):
            continue
        if abs(getattr(m, "scaling", m.attention_head_size ** -0.5) - m.attention_head_size ** -0.5) > 1e-6:
            continue
        found[name] = (m, act, levels, heads)
    return found


@torch.no_grad()
def behaves_alike(module: nn.Module, block: QAttentionBlock, hidden: torch.Tensor, seen_mask=None) -> bool:
    """Does ``block`` reproduce ``module`` on ``hidden``: without a mask, with the last key padded
    out in the form the model itself passes (``seen_mask``'s dtype: additive float or bool), and
    with ``seen_mask``?"""
    b, t, _ = hidden.shape
    if seen_mask is not None and seen_mask.dtype == torch.bool:
        pad = torch.ones(b, 1, t, t, dtype=torch.bool, device=hidden.device)
        pad[..., -1] = False
    else:
        pad = torch.zeros(b, 1, t, t, dtype=hidden.dtype, device=hidden.device)
        pad[..., -1] = torch.finfo(hidden.dtype).min
    for mask in (None, pad) + ((seen_mask,) if seen_mask is not None else ()):
        want = module(hidden, attention_mask=mask)
        want = want[0] if isinstance(want, tuple) else want
        got = block(hidden, attention_mask=mask)[0]
        if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-3, atol=1e-3 * want.abs().max()):
            return False
    return True


def fusable_attention(model, layers, acts, args, kwargs) -> dict:
    """{name: QAttentionBlock} for the self-attention modules of ``model`` that qualify: candidates
    from :func:`attention_blocks`, their inputs captured on the example batch (``args``/``kwargs``),
    key-padding masks only, and :func:`behaves_alike` on those inputs."""
    cands = attention_blocks(model, {n: (wq, aq) for n, _, wq, aq in layers}, acts)
    if not cands:
        return {}
    seen = {}

    def capture(name):
        def hook(mod, a, kw):
            mask = a[1] if len(a) > 1 else kw.get("attention_mask")
            seen.setdefault(name, (a[0] if a else kw.get("hidden_states"), mask))
        return hook
    hooks = [m.register_forward_pre_hook(capture(n), with_kwargs=True) for n, (m, *_) in cands.items()]
    try:
        model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, (m, act, levels, heads) in cands.items():
        blk = QAttentionBlock(m, act, levels, heads)
        x, mask = seen.get(n, (None, None))
        padding_only = mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4
                                        and torch.equal(mask, mask[:, :, :1, :].expand_as(mask)))
        if isinstance(x, torch.Tensor) and x.dim() == 3 and padding_only and behaves_alike(m, blk, x, mask):
            out[n] = blk
    return out
