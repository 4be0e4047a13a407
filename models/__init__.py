"""The LLaDA transformer in torch (loads real Hugging Face checkpoints) and the torch reference sampler.

Needs the ``export`` extra (torch, safetensors). The runtime never imports this package.
"""

from .checkpoint import CheckpointError, checkpoint_bytes, load_model, save_model
from .config import LLaDAConfig, UnsupportedConfigError
from .modeling import LLaDAModel
from .sampler import generate, get_num_transfer_tokens
from .tiny import make_tiny_checkpoint, make_tiny_model

__all__ = [
    "CheckpointError", "LLaDAConfig", "LLaDAModel", "UnsupportedConfigError", "checkpoint_bytes", "generate",
    "get_num_transfer_tokens", "load_model", "make_tiny_checkpoint", "make_tiny_model", "save_model",
]
