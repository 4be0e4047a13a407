"""Torch-free LLaDA runtime: numpy + onnxruntime + tokenizers (+ jinja2 for chat templates).

Never import torch here, directly or through a dependency: a plain ``pip install llada-onnx`` must run it.
"""

from .default_model import default_checkpoint_dir, default_onnx_dir
from .errors import InputError, LladaOnnxError, NotAnExportError
from .manifest import Manifest
from .noise import Noise
from .pipeline import Pipeline
from .providers import ProviderUnavailableError
from .sampler import StepInfo, generate_ids
from .session import GraphSession, UnsupportedGraphError
from .settings import SamplerSettings
from .text import TextCodec

__all__ = ["GraphSession", "InputError", "LladaOnnxError", "Manifest", "Noise", "NotAnExportError", "Pipeline",
           "ProviderUnavailableError", "SamplerSettings", "StepInfo", "TextCodec", "UnsupportedGraphError",
           "default_checkpoint_dir", "default_onnx_dir", "generate_ids"]
