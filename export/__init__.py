"""Export a LLaDA checkpoint to a self-contained ONNX directory (needs the ``export`` extra: torch, onnx)."""

from .exporter import DEFAULT_OPSET, ExportError, ExportResult, export, summary
from .quantize import Quantization
from .validate import ValidationError, validate_export

__all__ = ["DEFAULT_OPSET", "ExportError", "ExportResult", "Quantization", "ValidationError", "export",
           "summary", "validate_export"]
