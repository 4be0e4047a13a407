"""The LLaDA family in torch (loads real Hugging Face checkpoints), its registry, and the torch reference sampler.

Needs the ``export`` extra (torch, safetensors). The runtime never imports this package. Each architecture is a
module that registers itself (:mod:`.registry`); importing it here is what makes it known.
"""

from . import llada, llada2, llada_moe  # noqa: F401  (register dense LLaDA, LLaDA2 and LLaDA-MoE)
from .checkpoint import CheckpointError, checkpoint_bytes, load_model, save_model
from .config import LLaDAConfig, UnsupportedConfigError
from .modeling import LLaDAModel
from .registry import Architecture, architecture_of, read_checkpoint_config, register, supported
from .sampler import generate, get_num_transfer_tokens
from .tiny import make_tiny_checkpoint, make_tiny_model

__all__ = [
    "Architecture", "CheckpointError", "LLaDAConfig", "LLaDAModel", "UnsupportedConfigError", "architecture_of",
    "checkpoint_bytes", "generate", "get_num_transfer_tokens", "load_model", "make_tiny_checkpoint",
    "make_tiny_model", "read_checkpoint_config", "register", "save_model", "supported",
]
