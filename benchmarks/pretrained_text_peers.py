"""Peer PTQ tools for benchmarks/pretrained_ptq_text.py: models called as ``model(*batch)`` with a tuple of
tensors (MiniLM: ``(input_ids, attention_mask)``; the digits transformer: ``(pixels,)``).

Each peer is ``fn(model, calib, w_bits, names, threads) -> (predict, calib_seconds)``: ``calib`` is a list
of batches (tuples), ``names`` the ONNX input names, ``predict(batch) -> tensor`` runs the peer's
quantized model. ``calib_seconds`` times the peer's own quantize + calibrate call (not the ONNX export).
A peer that is not installed or cannot handle the model raises; the benchmark reports it as a row."""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import time
import warnings

import torch

from .pretrained_peers import _ort_session

os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")   # NNCF compiles a C++ op on first use
_ONNX: dict[int, str] = {}

NOTES = """Notes on the peers (same FP32 model, same calibration batches, same test inputs):
- onnxruntime 1.32, FP32 ONNX from `torch.onnx.export(dynamo=True)` of the same torch model. `quantize_static`:
  QDQ, per-channel symmetric weights (int8, int4 at W4), uint8 asymmetric activations, MinMax calibration; its
  QDQ model runs as written (graph optimisations off, float simulation of its quantized values). It also puts
  QDQ on the activation x activation MatMuls of attention (Q K^T, softmax V), which slimtorch leaves float, and
  on every other op it supports (Add, Mul, Softmax, LayerNormalization, Gather...); the "MatMul/Gemm only" row
  passes `op_types_to_quantize=["MatMul", "Gemm"]`, closer to what the other tools quantize.
  `quantize_dynamic` (the path onnxruntime documents for transformers): per-channel int8 weights, activations
  quantized per batch at run time (no calibration data; its "calib s" is the quantization call); W4 asks it for
  QInt4 weights.
- NNCF 3.4 `nncf.quantize(model_type=nncf.ModelType.TRANSFORMER)` (torch backend; its transformer defaults:
  SmoothQuant, fast bias correction), subset = every calibration sample; W4A8 via
  `AdvancedQuantizationParameters(weights_quantization_params=QuantizationParameters(num_bits=4))` with
  `target_device=NPU` (the ANY hardware config refuses 4-bit). The NPU config has no 4-bit embedding and NNCF
  checks that before it applies `ignored_scope`, so at W4 MiniLM's nn.Embedding tables are run as `index_select`
  (same values) and stay float; at W8 NNCF quantizes them.
- optimum-quanto 0.2.7: `quantize(weights=qint8|qint4, activations=qint8)`, `Calibration()` over the calibration
  batches, `freeze`. It replaces nn.Linear (and nn.LayerNorm) modules only: embeddings stay float, and
  nn.MultiheadAttention's in_proj_weight (used functionally) stays float.
- slimtorch rows: `st.quantize_(m, st.LSQPlus(w_bits=b, a_bits=8))` with no other option (every Linear and
  Embedding, nn.MultiheadAttention split into projections), `st.calibrate` on the calibration batches (a list of
  keyword dicts, input_ids / attention_mask, as a loader hands them), which bias-corrects (unless
  `bias_correction=False` is named) and at W4 rounds the weights by GPTQ. Fake-quantized torch."""


def export_onnx(model: torch.nn.Module, example: tuple, names: tuple[str, ...]) -> str:
    """The FP32 model as ONNX (dynamo exporter, batch dimension dynamic), cached per model."""
    if isinstance(_ONNX.get(id(model)), Exception):
        raise _ONNX[id(model)]                      # a failed export fails every onnxruntime row at once
    if id(model) in _ONNX:
        return _ONNX[id(model)]
    import io
    path = os.path.join(tempfile.mkdtemp(prefix="slimtorch_text_peers_"), "fp32.onnx")
    dyn = tuple({0: torch.export.Dim("b", min=1, max=1024)} for _ in example)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model).eval(), tuple(example), path, input_names=list(names),
                          dynamo=True, external_data=False, dynamic_shapes=dyn)
    with torch.no_grad():                           # the export itself must not be a source of error
        ref = model(*example)
    got = _session_predict(path, names, 1)(example)
    err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    if err > 1e-3:
        _ONNX[id(model)] = RuntimeError(f"the FP32 ONNX export differs from torch: max error {err:.2g} of max |out|")
        raise _ONNX[id(model)]
    _ONNX[id(model)] = path
    return path


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime's quantizer warns through the root logger (one line per LayerNorm weight...)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _feeds(batch, names) -> dict:
    return {n: t.numpy() for n, t in zip(names, batch)}


def _session_predict(path, names, threads):
    sess = _ort_session(path, threads)
    return lambda b: torch.from_numpy(sess.run(None, _feeds(b, names))[0])


def ort_static(method: str = "MinMax", ops: tuple | None = None):
    """onnxruntime ``quantize_static`` (QDQ, per-channel weights, uint8 activations, ``method``), on
    every op type it supports or only on ``ops``."""
    def run(model, calib, w_bits, names, threads=1):
        import onnxruntime
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
        onnxruntime.set_default_logger_severity(3)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter([_feeds(b, names) for b in calib])

            def get_next(self):
                return next(self.it, None)

        src = export_onnx(model, calib[0], names)
        dst = src.replace("fp32.onnx", f"static_{method}_{'_'.join(ops or ('all',))}_w{w_bits}.onnx")
        t = time.perf_counter()
        with _quiet_root_logger():
            quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8 if w_bits == 8 else QuantType.QInt4,
                            calibrate_method=getattr(CalibrationMethod, method),
                            op_types_to_quantize=list(ops) if ops else None)
        secs = time.perf_counter() - t
        return _session_predict(dst, names, threads), secs
    return run


def ort_dynamic(model, calib, w_bits, names, threads=1):
    """onnxruntime ``quantize_dynamic``: per-channel weights, activations quantized at run time."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic
    onnxruntime.set_default_logger_severity(3)
    src = export_onnx(model, calib[0], names)
    dst = src.replace("fp32.onnx", f"dynamic_w{w_bits}.onnx")
    t = time.perf_counter()
    with _quiet_root_logger():
        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8 if w_bits == 8 else QuantType.QInt4)
    secs = time.perf_counter() - t
    return _session_predict(dst, names, threads), secs


class _FloatLookup(torch.nn.Embedding):
    """An nn.Embedding run as index_select (same values): NNCF sees no embedding op and leaves it float."""

    def forward(self, ids):
        return self.weight.index_select(0, ids.reshape(-1)).reshape(*ids.shape, -1)


def nncf_quantize(model, calib, w_bits, names, threads=1):
    """NNCF ``nncf.quantize`` for transformers (model_type=TRANSFORMER), one sample per dataset item."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters
    items = [tuple(t[i:i + 1] for t in b) for b in calib for i in range(len(b[0]))]
    adv = None if w_bits == 8 else AdvancedQuantizationParameters(
        weights_quantization_params=QuantizationParameters(num_bits=w_bits))
    dev = nncf.TargetDevice.ANY if w_bits == 8 else nncf.TargetDevice.NPU     # ANY allows 8-bit only
    m = copy.deepcopy(model).eval()
    if w_bits != 8:              # the NPU config has no 4-bit embedding (and ignored_scope does not skip that check)
        for e in m.modules():
            if type(e) is torch.nn.Embedding:
                e.__class__ = _FloatLookup
    t = time.perf_counter()
    q = nncf.quantize(m, nncf.Dataset(items), subset_size=len(items), model_type=nncf.ModelType.TRANSFORMER,
                      target_device=dev, advanced_parameters=adv)
    secs = time.perf_counter() - t
    q.eval()
    return (lambda b: q(*b)), secs


def quanto(model, calib, w_bits, names, threads=1):
    """optimum-quanto: ``quantize(weights=qint8|qint4, activations=qint8)``, ``Calibration``, ``freeze``."""
    from optimum.quanto import Calibration, freeze, qint4, qint8, quantize
    m = copy.deepcopy(model).eval()
    t = time.perf_counter()
    quantize(m, weights=qint8 if w_bits == 8 else qint4, activations=qint8)
    with torch.no_grad(), Calibration():
        for b in calib:
            m(*b)
    freeze(m)
    secs = time.perf_counter() - t
    return (lambda b: m(*b)), secs


def peers() -> dict:
    return {"onnxruntime quantize_static QDQ MinMax": ort_static("MinMax"),
            "onnxruntime quantize_static QDQ MinMax, MatMul/Gemm only": ort_static("MinMax", ("MatMul", "Gemm")),
            "onnxruntime quantize_dynamic (per-channel)": ort_dynamic,
            "NNCF nncf.quantize (model_type=TRANSFORMER)": nncf_quantize,
            "optimum-quanto (qint8 activations)": quanto}
