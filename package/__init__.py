"""llada-onnx: run LLaDA, a masked diffusion language model, on ONNX Runtime without PyTorch.

Subpackages: :mod:`llada_onnx.runtime` (numpy + onnxruntime + tokenizers), :mod:`llada_onnx.export`
(checkpoint -> ONNX, needs torch) and :mod:`llada_onnx.models` (the torch model and reference sampler).
"""

from .runtime import LladaOnnxError, Pipeline, SamplerSettings, StepInfo

__version__ = "0.1.0"
__all__ = ["LladaOnnxError", "Pipeline", "SamplerSettings", "StepInfo", "__version__"]
