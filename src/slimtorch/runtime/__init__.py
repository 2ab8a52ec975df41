"""Runtime pieces used by loaded packed models: int8 GEMM layers and latency measurement."""
from .bench import latency

__all__ = ["latency"]
