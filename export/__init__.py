"""Export a LLaDA checkpoint to a self-contained ONNX directory (needs the ``export`` extra: torch, onnx)."""

from .exporter import DEFAULT_OPSET, ExportError, ExportResult, export, parameter_count, summary
from .quantize import Quantization
from .validate import ValidationError, validate_export

__all__ = ["DEFAULT_OPSET", "ExportError", "ExportResult", "Quantization", "ValidationError", "export",
           "parameter_count", "summary", "validate_export"]
