"""ONNX export with QuantizeLinear/DequantizeLinear, runnable by onnxruntime on the CPU.

Each quantized layer is swapped (only for the duration of the export) for a module that emits:
  input:  [Sub beta] -> QuantizeLinear(s, z) -> [Clip when narrower than 8 bits] -> DequantizeLinear
          (uint8, zero point z = -q_n: 128 for signed 8-bit levels, 0 for unsigned, the learned
          integer zero point of LSQ+ with integer_offset; static scale learned by QAT)
  weight: int8/uint8 initializer of the integer levels -> DequantizeLinear (per-tensor or axis)
          Linear: MatMul(x, DQ(W^T)) (+ bias), the pattern onnxruntime fuses into integer GEMMs;
          with ``matmul_nbits`` 2..4-bit Linear weights become com.microsoft MatMulNBits (4-bit
          blocks, zero point 8, per-block scale = the layer's step). ``kernels="ort"``: 8-bit
          Linear layers become com.microsoft MatMulIntegerToFloat(QuantizeLinear(x), W_int, bias)
          directly (bias fused; onnxruntime only), instead of the DQ -> MatMul -> Add it rebuilds,
          and self-attention blocks whose Q/K/V share one input quantizer become one QAttention
          (onnx_attention.py).
  LSQ+ offsets fold into the bias (Linear, unpadded Conv) or are added back after DQ (padded Conv).
Quantizers whose codes are not an affine grid (decode != (codes + q_n) * s) export float weights.
Product-quantized layers export their codebook and codes, W = Gather(C, codes) (onnx_pq.py).
onnxruntime fuses these patterns into integer kernels (MatMulIntegerToFloat, QLinearConv, QGemm);
its Conv/Gemm fusions round the bias to int32 and requantize, so a rare code differs from PyTorch.
``exact=True`` dequantizes with Cast/Sub/Mul instead: float kernels, PyTorch's arithmetic.
The written file gets onnx_layernorm.py's exact rewrite (residual Add -> LayerNorm kept off
onnxruntime's slow CPU SkipLayerNormalization) unless ``fuse_skip_layernorm=True``."""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..attach import input_quantizer, raw_weight, weight_transforms
from ..errors import ConfigError
from ..quant.api import quantized_layers
from ..cost import layer_kind
from .onnx_pq import PQLayer, pq_export_layers, pq_exportable


def _sym(op, inputs, like, dtype=None, shape=None, **attrs):
    return torch.onnx.ops.symbolic(f"::{op}", inputs, attrs or None, dtype=dtype or like.dtype,
                                   shape=like.shape if shape is None else shape)


def _const(value, dtype):
    return torch.tensor(value, dtype=dtype)


def _zero_point(q_n: int, q_p: int) -> int:
    if not (-255 <= q_n <= 0 <= q_p and q_p - q_n <= 255):
        raise ConfigError(f"activation levels [{q_n}, {q_p}] do not fit uint8 with a zero point")
    return -q_n


def act_quant(x, scale, q_n: int, q_p: int):
    """uint8 codes clamp(round(x / s), q_n, q_p) - q_n: QuantizeLinear(s, -q_n) [-> Clip]."""
    z = _zero_point(q_n, q_p)
    q = _sym("QuantizeLinear", (x, scale, _const(z, torch.uint8)), x, dtype=torch.uint8)
    if q_p - q_n != 255:
        q = _sym("Clip", (q, _const(0, torch.uint8), _const(q_p - q_n, torch.uint8)), q)
    return q, z


def act_qdq(x, scale, q_n: int, q_p: int, exact: bool = False):
    """clamp(round(x / s), q_n, q_p) * s; in ONNX: QuantizeLinear [-> Clip] -> DequantizeLinear
    on uint8 with zero point -q_n (the u8 x s8 kernels onnxruntime runs fastest).
    ``exact``: dequantize with Cast/Sub/Mul instead, so onnxruntime keeps float kernels."""
    if not torch.onnx.is_in_onnx_export():
        return torch.clamp(torch.round(x / scale), q_n, q_p) * scale
    q, z = act_quant(x, scale, q_n, q_p)
    zp = _const(z, torch.uint8)
    if exact:
        f = _sym("Cast", (q,), x, dtype=scale.dtype, to=1)
        return _sym("Mul", (_sym("Sub", (f, _const(float(z), scale.dtype)), f), scale), f)
    return _sym("DequantizeLinear", (q, scale, zp), x, dtype=scale.dtype)


def weight_dq(w_int, scale, axis: int, exact: bool = False):
    """w_int * scale (scale per-tensor or along ``axis``); in ONNX: DequantizeLinear (``exact``:
    Cast and Mul, which onnxruntime folds into float weights instead of fusing integer kernels)."""
    if exact and torch.onnx.is_in_onnx_export():
        shape = [1] * w_int.dim()
        if scale.dim():
            shape[axis] = -1
        return _sym("Cast", (w_int,), w_int, dtype=scale.dtype, to=1) * scale.reshape(shape)
    if scale.dim() == 0:
        if not torch.onnx.is_in_onnx_export():
            return w_int.to(scale.dtype) * scale
        return _sym("DequantizeLinear", (w_int, scale, _const(0, w_int.dtype)), w_int, dtype=scale.dtype)
    if not torch.onnx.is_in_onnx_export():
        shape = [1] * w_int.dim()
        shape[axis] = -1
        return w_int.to(scale.dtype) * scale.reshape(shape)
    zp = torch.zeros(scale.shape[0], dtype=w_int.dtype)
    return _sym("DequantizeLinear", (w_int, scale, zp), w_int, dtype=scale.dtype, axis=axis)


def matmul_int_to_float(q, zp: int, a_scale, w_int_t, w_scale, bias, like):
    """com.microsoft MatMulIntegerToFloat: (q - zp) @ W_int^T * (s_a * s_w) + bias, with q the
    uint8 codes of ``act_quant`` and ``w_int_t`` the int8 levels as [in, out]."""
    return torch.onnx.ops.symbolic(
        "com.microsoft::MatMulIntegerToFloat",
        (q, w_int_t, a_scale, w_scale, _const(zp, torch.uint8), None, bias), None,
        dtype=like.dtype, shape=(*like.shape[:-1], w_int_t.shape[1]), version=1)


def matmul_nbits(x, packed, scales, w_hat, k: int, n: int, block: int, accuracy: int = 0):
    """x @ w_hat.T; in ONNX: com.microsoft MatMulNBits (4-bit, zero point 8) on ``packed``;
    ``accuracy`` 0 computes in float (exact), 4 lets onnxruntime quantize x to int8 per block."""
    if not torch.onnx.is_in_onnx_export():
        return x @ w_hat.t()
    return torch.onnx.ops.symbolic(
        "com.microsoft::MatMulNBits", (x, packed, scales),
        {"K": k, "N": n, "bits": 4, "block_size": block, "accuracy_level": accuracy},
        dtype=x.dtype, shape=(*x.shape[:-1], n), version=1)


class _Act(nn.Module):
    def __init__(self, aq, exact=False):
        super().__init__()
        self.exact = exact
        p = aq.quant_params()
        self.per_channel = p["scale"].numel() != 1      # a model input, quant/model_input.py
        shape = p["scale"].shape if self.per_channel else ()
        self.register_buffer("scale", p["scale"].reshape(shape).clone())
        self.register_buffer("offset", None if p["offset"] is None else p["offset"].reshape(shape).clone())
        if isinstance(p["q_n"], torch.Tensor):
            raise ConfigError("ONNX export: per-channel integer zero points are not supported")
        self.q_n, self.q_p = int(p["q_n"]), int(p["q_p"])

    def forward(self, x, add_offset=True):
        u = x - self.offset if self.offset is not None else x
        if self.per_channel:    # one step per channel: plain Div / Round / Clip / Mul, exact
            y = torch.round(u / self.scale).clamp(self.q_n, self.q_p) * self.scale
        else:
            y = act_qdq(u, self.scale, self.q_n, self.q_p, self.exact)
        return y + self.offset if self.offset is not None and add_offset else y

    def codes(self, x):
        """(uint8 codes, zero point) of the folded input, for integer-kernel nodes (export only)."""
        return act_quant(x - self.offset if self.offset is not None else x, self.scale, self.q_n, self.q_p)


def _affine_levels(wq, w_in):
    """(integer levels int8/uint8, scale) when the weight quantizer is an affine grid, else None."""
    try:
        p = wq.quant_params()
    except Exception:
        return None
    codes = wq.encode(w_in)
    levels = codes + int(p["q_n"])
    if p["offset"] is not None or levels.min() < -128 or levels.max() > 255:
        return None
    s = p["scale"]
    if s.numel() > 1 and s.numel() != w_in.shape[0]:
        return None
    if not torch.equal(wq.decode(codes), levels.to(s.dtype) * s):
        return None
    dt = torch.int8 if levels.min() < 0 or levels.max() < 128 else torch.uint8
    return levels.to(dt), s.reshape(-1).clone()


def _on_int32_grid(bias, a_scale, w_scale) -> bool:
    """Is ``bias`` a whole multiple of s_x * s_w (what integer kernels add to the accumulator)?"""
    k = bias / (a_scale.reshape(()) * w_scale.reshape(-1)).expand(bias.shape)
    return bool((k - torch.round(k)).abs().max() <= 1e-3)


def layer_levels(m: nn.Module, wq):
    """(integer levels, steps) of layer ``m``'s weight under its quantizer ``wq``, or None."""
    if wq is None:
        return None
    x = raw_weight(m)
    for t in weight_transforms(m):
        if t is wq:
            break
        x = t(x)
    return _affine_levels(wq, x.detach())


class _QLayer(nn.Module):
    """Export stand-in for a quantized Linear / Conv1d / Conv2d / Embedding."""

    def __init__(self, m, wq, aq, nbits_block=0, nbits_accuracy=0, exact=False, kernels="qdq", act=None):
        super().__init__()
        self.kind = layer_kind(m)
        if self.kind not in ("Linear", "Conv1d", "Conv2d", "Embedding"):
            raise ConfigError(f"export_onnx: cannot export a quantized {type(m).__name__}")
        self.conv_args = ((m.stride, m.padding, m.dilation, m.groups) if self.kind.startswith("Conv")
                          else m.padding_idx if self.kind == "Embedding" else None)
        self.act = act if act is not None else _Act(aq, exact) if aq is not None else None
        self.exact = exact
        w_hat = m.weight.detach()
        bias = m.bias.detach().clone() if getattr(m, "bias", None) is not None else None
        padded = self.kind.startswith("Conv") and (m.padding == "same" or any(p for p in m.padding))
        self.fold = (self.act is not None and self.act.offset is not None and not padded
                     and not self.act.per_channel)
        if self.fold:  # y = W (s x_bar + beta) + b = W (s x_bar) + (b + beta W 1)
            fan = w_hat.reshape(w_hat.shape[0], -1).sum(1)
            bias = (bias if bias is not None else torch.zeros_like(fan)) + self.act.offset * fan
        self.register_buffer("bias", bias)
        lv = layer_levels(m, wq)
        self.nbits = None
        integer_in = self.act is not None and not self.act.per_channel    # one input scale
        self.rounds_bias = lv is not None and integer_in and not exact and (
            self.fold or (bias is not None and not _on_int32_grid(bias, self.act.scale, lv[1])))
        if lv is not None and self.kind == "Linear" and nbits_block and lv[0].dtype == torch.int8 \
                and lv[0].min() >= -8 and lv[0].max() <= 7:
            from .bitpack import pack
            n, k = w_hat.shape
            blocks = -(-k // nbits_block)
            codes = torch.zeros(n, blocks * nbits_block, dtype=torch.int64)
            codes[:, :k] = lv[0].to(torch.int64) + 8
            codes[:, k:] = 8
            packed = torch.from_numpy(pack(codes, 4)).reshape(n, blocks, nbits_block // 2)
            self.register_buffer("nb_packed", packed)
            self.register_buffer("nb_scales", lv[1].expand(n).repeat_interleave(blocks).clone())
            self.register_buffer("w_hat", w_hat.clone())
            self.nbits = (k, n, nbits_block, nbits_accuracy)
        elif lv is not None:
            levels, scale = lv
            self.axis = 1 if self.kind == "Linear" else 0
            self.register_buffer("w_int", levels.t().contiguous() if self.kind == "Linear" else levels)
            self.register_buffer("w_scale", scale if scale.numel() > 1 else scale.reshape(()))
            self.fused = (kernels == "ort" and self.kind == "Linear" and self.act is not None
                          and not self.act.per_channel and levels.dtype == torch.int8 and not exact)
            self.rounds_bias = self.rounds_bias and not self.fused   # MatMulIntegerToFloat adds it in float
        else:
            self.register_buffer("w_int", None)
            self.register_buffer("w_float", (w_hat.t().contiguous() if self.kind == "Linear" else w_hat).clone())

    def weight(self):
        if self.w_int is None:
            return self.w_float
        return weight_dq(self.w_int, self.w_scale, self.axis, self.exact)

    def forward(self, x, *args, **kwargs):
        if self.kind == "Embedding":
            if self.w_int is not None and self.w_scale.dim() == 1:   # per-row scale
                rows = F.embedding(x, self.w_int).to(self.w_scale.dtype)
                return rows * F.embedding(x, self.w_scale.reshape(-1, 1))
            if self.w_int is not None:
                return weight_dq(F.embedding(x, self.w_int), self.w_scale, 0, self.exact)
            return F.embedding(x, self.w_float, self.conv_args)
        if getattr(self, "fused", False) and torch.onnx.is_in_onnx_export():
            q, zp = self.act.codes(x)
            bias = self.bias if self.bias is not None else torch.zeros(self.w_int.shape[1], device=x.device)
            return matmul_int_to_float(q, zp, self.act.scale, self.w_int, self.w_scale, bias, x)
        if self.act is not None:
            x = self.act(x, add_offset=not self.fold)
        if self.nbits is not None:
            y = matmul_nbits(x, self.nb_packed, self.nb_scales, self.w_hat, *self.nbits)
            return y + self.bias if self.bias is not None else y
        if self.kind == "Linear":
            y = torch.matmul(x, self.weight())
            return y + self.bias if self.bias is not None else y
        conv = F.conv1d if self.kind == "Conv1d" else F.conv2d
        return conv(x, self.weight(), self.bias, *self.conv_args)


def _shared_acts(quantizers, exact) -> dict:
    """{id(quantizer): export module}; quantizers with identical parameters (one shared object, or
    copies of it after a packed reload) get one module, so one QuantizeLinear per shared input."""
    by_value, out = {}, {}
    for aq in quantizers:
        act = _Act(aq, exact)
        key = (act.q_n, act.q_p, act.scale.detach().cpu().numpy().tobytes(),
               None if act.offset is None else act.offset.detach().cpu().numpy().tobytes())
        out[id(aq)] = by_value.setdefault(key, act)
    return out


def _swap(model, name, new):
    parent, _, child = name.rpartition(".")
    mod = model.get_submodule(parent) if parent else model
    old = getattr(mod, child)
    setattr(mod, child, new)
    return old


def _dynamic_batch(example_inputs):
    b = torch.export.Dim("batch")
    if isinstance(example_inputs, dict):
        return {k: {0: b} for k in example_inputs}
    return tuple({0: b} for _ in example_inputs)


@torch.no_grad()
def export_onnx(model: nn.Module, path, example_inputs, *, input_names=None, output_names=None,
                dynamic_shapes="batch", matmul_nbits: int = 0, nbits_accuracy: int = 0,
                exact: bool = False, kernels: str = "qdq", opset: int | None = None,
                fuse_skip_layernorm: bool = False, check: bool = True) -> Path:
    """Export a quantized model (fake-quant, or ``load_packed(..., runtime="fakequant")``) to ONNX
    with torch's dynamo exporter (``opset`` None: the exporter's default, 20 in torch 2.13).

    ``example_inputs``: a tensor, a tuple of positional args, or a dict of keyword args (e.g. a
    tokenizer output). ``dynamic_shapes``: "batch" (dim 0 of every input), None (static) or a
    ``torch.export`` dynamic_shapes spec. ``matmul_nbits``: block size (power of two >= 16) to emit
    MatMulNBits for Linear weights with levels in [-8, 7]; 0 keeps QDQ. ``nbits_accuracy``: its
    accuracy_level (0: float compute, exact; 4: int8 compute, faster, inexact). ``exact``: keep
    onnxruntime on float kernels (its integer fusions round biases to int32 and requantize, which
    can flip a code); outputs then match PyTorch to float rounding. ``kernels``: "qdq" (standard
    ONNX, any runtime) or "ort" (fused int8 QAttention for qualifying self-attention blocks, and
    8-bit Linear layers as onnxruntime's MatMulIntegerToFloat with
    the bias fused; on MiniLM faster than the QDQ graph's separate
    bias Add; concatenating Q/K/V into one GEMM + Split was slower, so it is not done).
    Layers that share one input quantizer object (``share_input_quantizers``) share its
    QuantizeLinear node. ``fuse_skip_layernorm``: False (default) rewrites each residual Add ->
    LayerNormalization so onnxruntime's CPU keeps its fast LayerNorm kernel instead of fusing
    its SkipLayerNormalization (2.6x the kernel time on MiniLM, RESULTS.md; exact, see
    onnx_layernorm.py); True leaves the graph for runtimes whose fused kernel is fast (GPU). The model is unchanged."""
    from .onnx_attention import fusable_attention
    if kernels not in ("qdq", "ort"):
        raise ConfigError(f"kernels must be 'qdq' or 'ort', got {kernels!r}")
    if matmul_nbits and (matmul_nbits < 16 or matmul_nbits & (matmul_nbits - 1)):
        raise ConfigError(f"matmul_nbits block size must be a power of two >= 16, got {matmul_nbits}")
    layers = [(n, m, wq, aq) for n, m, wq, aq in quantized_layers(model)]
    pq_rows = pq_export_layers(model, {n for n, *_ in layers})      # codebook layers (onnx_pq.py)
    if not layers and not pq_rows:
        raise ConfigError("export_onnx: the model has no quantized layer (quantize_ or pq_ it, or load it "
                          "with load_packed(..., runtime='fakequant'))")
    if any(n == "" for n, *_ in layers + pq_rows):
        raise ConfigError("export_onnx: the root module itself cannot be a quantized layer")
    kwargs = {}
    if isinstance(example_inputs, dict):
        kwargs, example_inputs = dict(example_inputs), ()
        input_names = input_names or list(kwargs)
    elif not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    if dynamic_shapes == "batch":
        dynamic_shapes = _dynamic_batch(kwargs or example_inputs)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    swapped = []
    try:
        acts = _shared_acts([aq for *_, aq in layers if aq is not None], exact)
        blocks = {}
        if kernels == "ort" and not exact:
            blocks = fusable_attention(model, layers, acts, example_inputs, kwargs)
        for n, blk in blocks.items():
            swapped.append((n, _swap(model, n, blk)))
        for n, m, wq, aq in layers + pq_rows:
            if any(n.startswith(b + ".") for b in blocks):
                continue
            act = acts[id(aq)] if aq is not None else None
            swapped.append((n, _swap(model, n, PQLayer(m, act) if wq is None and pq_exportable(m) else
                                     _QLayer(m, wq, aq, matmul_nbits, nbits_accuracy, exact, kernels, act))))
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, example_inputs, str(path), kwargs=kwargs or None, dynamo=True,
                              opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_shapes=dynamic_shapes,
                              external_data=False, verbose=False)
        rounding = [n for n, _ in swapped if getattr(model.get_submodule(n), "rounds_bias", False)]
    finally:
        for n, old in reversed(swapped):
            _swap(model, n, old)
        for m, mode in modes.items():
            m.training = mode
    if rounding:
        warnings.warn(f"export_onnx: {len(rounding)} layer(s) ({', '.join(rounding[:3])}"
                      f"{', ...' if len(rounding) > 3 else ''}) have a bias (or a folded LSQ+ offset) off the "
                      "s_x*s_w grid; onnxruntime's fused integer kernels round it to int32 themselves, so a "
                      "code can differ from PyTorch now and then. Quantize with bias='int32' (and "
                      "integer_offset=True for LSQ+) for an exact match, or export with exact=True.",
                      stacklevel=3)
    if not fuse_skip_layernorm:
        from .onnx_layernorm import unfuse_skip_layernorm_file
        unfuse_skip_layernorm_file(path)
    if check:
        import onnx
        onnx.checker.check_model(str(path))
    return Path(path)


def ort_session(path, threads: int = 2, optimization: str = "all"):
    """An onnxruntime CPU session with ``threads`` intra-op threads."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
