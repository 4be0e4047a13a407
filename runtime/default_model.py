"""The embedded default model: a ~4.4M-parameter LLaDA trained by the project on Shakespeare.

It ships inside the package (``llada_onnx/default_model``): ``onnx/`` is the export the runtime loads when no
model directory is given, ``checkpoint/`` the bf16 weights in the official layout it was exported from (for the
torch side: re-export, tests, fine-tuning), ``training.json`` the recipe and losses. It is a base model: raw
prompts, no chat template. How it was made is in ``llada_onnx.models.corpus`` and ``llada_onnx.models.train``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def default_model_dir() -> Path:
    """The folder holding ``onnx/``, ``checkpoint/`` and ``training.json``."""
    return Path(str(resources.files("llada_onnx") / "default_model"))


def default_onnx_dir() -> Path:
    return default_model_dir() / "onnx"


def default_checkpoint_dir() -> Path:
    return default_model_dir() / "checkpoint"
