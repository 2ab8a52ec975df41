"""Runtime pieces used by loaded packed models: int8 GEMM layers, product-quantized Linear layers
(LUT matmul or dense rebuild, pq_lut.py) and latency measurement."""
from .bench import latency
from .pq_lut import PQLinear, lut_matmul

__all__ = ["latency", "PQLinear", "lut_matmul"]
