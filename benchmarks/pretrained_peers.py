"""Peer PTQ tools for benchmarks/pretrained_ptq.py, on the same model and crops.

Each peer is ``fn(float_model, calib_batches, w_bits) -> (predict, calib_seconds)`` where
``predict(x) -> logits`` runs the peer's quantized model (onnxruntime: its QDQ model in an ORT
session; NNCF / optimum-quanto: their fake-/real-quantized torch modules). ``calib_seconds`` times
the peer's own quantize + calibrate call (not the ONNX export). A peer that is not installed raises
ImportError; ``pretrained_ptq.main`` reports it as a row."""
from __future__ import annotations

import copy
import os
import tempfile
import time

import torch

os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")   # NNCF compiles a C++ op on first use (~1 min here)
_ONNX_CACHE: dict[int, str] = {}

NOTES = """Notes on the peers (same FP32 model, same calibration batches of 8, same test crops):
- onnxruntime 1.32 `quantize_static`: FP32 ONNX from `torch.onnx.export(dynamo=False)` (BN folded), QDQ, per-channel
  symmetric int8 weights (int4 at W4), uint8 asymmetric activations; calibration = `quantize_static` time. Its rows
  run the QDQ model as written (graph optimisations off: float simulation of exactly its quantized values, as our
  fake quant is). The "fused integer kernels" row lets ORT fuse to QLinearConv (u8s8): on a CPU without VNNI those
  kernels can saturate (ORT documents it; `reduce_range` or u8u8 avoid it; an earlier run on
  an AVX2 machine saw them collapse), a deployment hazard, not a calibration one: compare it with the QDQ MinMax row of the same run.
- NNCF 3.4 `nncf.quantize` (torch backend, its defaults incl. fast bias correction, subset = the 32 crops); W4A8 via
  `AdvancedQuantizationParameters(weights_quantization_params=QuantizationParameters(num_bits=4))` with
  `target_device=NPU` (the ANY hardware config refuses 4-bit). Installed with `pip install --no-deps` + light deps.
- optimum-quanto 0.2.7 (`--no-deps`): `quantize(weights=qint8|qint4, activations=qint8)`, `Calibration()` over the
  calibration batches, `freeze`. Its QConv2d drops the package's static same-padding forward, so its convs are
  first rewritten as Sequential(ZeroPad2d, Conv2d) (identical FP32 outputs). Symmetric int8 activations.
- slimtorch rows are fake-quantized torch (`quantize_` + `calibrate`, which bias-corrects unless `bias_correction=False`
  is named and at W<=4 rounds the weights by GPTQ unless `rounding='nearest'` is named; `gptq_` / `adaround_` where
  named), BN unfolded; the first conv's input (the normalised image) is quantized per channel unless
  `model_input='per_tensor'` is named. "calib s" of a slimtorch row includes the rounding."""


def export_fp32(model: torch.nn.Module, size: int = 240) -> str:
    """The FP32 model as ONNX (TorchScript exporter, BN folded by its eval peephole), cached."""
    if id(model) in _ONNX_CACHE:
        return _ONNX_CACHE[id(model)]
    path = os.path.join(tempfile.mkdtemp(prefix="slimtorch_peers_"), "fp32.onnx")
    x = torch.zeros(1, 3, size, size)
    torch.onnx.export(copy.deepcopy(model).eval(), (x,), path, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, opset_version=21, dynamo=False)
    _ONNX_CACHE[id(model)] = path
    return path


def _ort_session(path: str, threads: int, fused: bool = False):
    """``fused``: ORT's integer kernels (QLinearConv...); else QDQ run as written (float simulation)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    if not fused:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_static(method: str, fused: bool = False):
    """onnxruntime ``quantize_static``: QDQ, per-channel symmetric weights (int8, or int4 at w_bits=4),
    uint8 asymmetric activations, calibration ``method`` (MinMax / Percentile / Entropy). The QDQ
    model runs as written (float simulation of the quantized model) unless ``fused``."""
    def run(model, calib, w_bits, threads=1):
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter([{"input": b.numpy()} for b in calib])

            def get_next(self):
                return next(self.it, None)

        import onnxruntime
        onnxruntime.set_default_logger_severity(3)
        src = export_fp32(model, calib[0].shape[-1])
        dst = src.replace("fp32.onnx", f"q_{method}_w{w_bits}.onnx")
        t = time.perf_counter()
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8 if w_bits == 8 else QuantType.QInt4,
                        calibrate_method=getattr(CalibrationMethod, method))
        secs = time.perf_counter() - t
        sess = _ort_session(dst, threads, fused)
        return (lambda x: torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])), secs
    return run


def nncf_quantize(model, calib, w_bits, threads=1):
    """NNCF ``nncf.quantize`` with its defaults (preset performance, per-channel weights, fast bias
    correction on), subset = all calibration crops; W4 through the advanced weight parameters."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters
    items = [x[None] for b in calib for x in b]
    adv = None if w_bits == 8 else AdvancedQuantizationParameters(
        weights_quantization_params=QuantizationParameters(num_bits=w_bits))
    m = copy.deepcopy(model).eval()
    t = time.perf_counter()
    dev = nncf.TargetDevice.ANY if w_bits == 8 else nncf.TargetDevice.NPU     # ANY allows 8-bit only
    q = nncf.quantize(m, nncf.Dataset(items), subset_size=len(items), target_device=dev, advanced_parameters=adv)
    secs = time.perf_counter() - t
    q.eval()
    return (lambda x: q(x)), secs


def plain_convs_(model: torch.nn.Module) -> torch.nn.Module:
    """Replace the package's Conv2dStaticSamePadding by Sequential(pad, nn.Conv2d) (same outputs):
    quanto swaps Conv2d subclasses for its QConv2d, which drops their overridden forward."""
    for name, child in list(model.named_children()):
        if isinstance(child, torch.nn.Conv2d) and hasattr(child, "static_padding"):
            conv = torch.nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                   child.padding, child.dilation, child.groups, child.bias is not None)
            conv.load_state_dict(child.state_dict(), strict=False)
            setattr(model, name, torch.nn.Sequential(child.static_padding, conv))
        else:
            plain_convs_(child)
    return model


def quanto(model, calib, w_bits, threads=1):
    """optimum-quanto: ``quantize(weights=qint8|qint4, activations=qint8)``, ``Calibration`` over all
    calibration batches, ``freeze``."""
    from optimum.quanto import Calibration, freeze, qint4, qint8, quantize
    m = plain_convs_(copy.deepcopy(model)).eval()
    t = time.perf_counter()
    quantize(m, weights=qint8 if w_bits == 8 else qint4, activations=qint8)
    with torch.no_grad(), Calibration():
        for b in calib:
            m(b)
    freeze(m)
    secs = time.perf_counter() - t
    return (lambda x: m(x)), secs


def peers() -> dict:
    return {"onnxruntime quantize_static QDQ MinMax": ort_static("MinMax"),
            "onnxruntime quantize_static QDQ Percentile": ort_static("Percentile"),
            "onnxruntime quantize_static QDQ Entropy": ort_static("Entropy"),
            "onnxruntime MinMax, fused integer kernels (u8s8)": ort_static("MinMax", fused=True),
            "NNCF nncf.quantize (defaults)": nncf_quantize,
            "optimum-quanto (qint8 activations)": quanto}
