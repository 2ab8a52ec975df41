"""Packed export: bit packing, the packed file (save_packed / load_packed), file reports, ONNX."""
from .bitpack import pack, packed_size, unpack
from .file_report import FileReport, file_report
from .modelspec import zoo_spec
from .onnx_export import export_onnx
from .packed import FORMAT, VERSION, load_packed, read_packed, save_packed

__all__ = ["pack", "unpack", "packed_size", "save_packed", "load_packed", "read_packed", "file_report",
           "FileReport", "export_onnx", "zoo_spec", "FORMAT", "VERSION"]
