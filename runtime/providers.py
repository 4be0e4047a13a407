"""Execution-provider selection and the session options each provider needs.

onnxruntime silently runs on the CPU when a requested provider is missing or fails to load; an app that asked
for a GPU should hear about it. So a missing provider is an error naming the package that brings it, unless the
caller allowed a fallback, which is then reported.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence, Union

import onnxruntime as ort

from .errors import InputError, LladaOnnxError

ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider",
           "directml": "DmlExecutionProvider"}
PACKAGES = {
    "CUDAExecutionProvider": "onnxruntime-gpu (pip install 'llada-onnx[cuda]' in an environment without plain "
                             "onnxruntime)",
    "DmlExecutionProvider": "onnxruntime-directml on Windows (pip install 'llada-onnx[directml]' in an environment "
                            "without plain onnxruntime)",
    "TensorrtExecutionProvider": "onnxruntime-gpu with TensorRT",
}
ProviderSpec = Union[str, Sequence[Union[str, tuple[str, dict[str, Any]]]]]


class ProviderUnavailableError(LladaOnnxError, RuntimeError):
    """The requested execution provider is not in this onnxruntime build (or failed to initialise)."""


def resolve(provider: ProviderSpec, device_id: int = 0,
            available: Sequence[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Turn ``"cpu"|"cuda"|"dml"`` or an onnxruntime provider list into ``[(name, options), ...]``."""
    available = list(ort.get_available_providers() if available is None else available)
    items = [provider] if isinstance(provider, str) else list(provider)
    if not items:
        raise InputError("provider list is empty; use 'cpu', 'cuda', 'dml' or onnxruntime provider names")
    resolved = []
    for item in items:
        name, options = (item, {}) if isinstance(item, str) else (item[0], dict(item[1]))
        name = ALIASES.get(name.lower(), name) if isinstance(name, str) else name
        if name not in available:
            brings = PACKAGES.get(name, "a matching onnxruntime package")
            raise ProviderUnavailableError(
                f"execution provider {name} is not available in this onnxruntime build "
                f"(available: {', '.join(available)}); it comes with {brings}")
        if name in ("CUDAExecutionProvider", "DmlExecutionProvider", "TensorrtExecutionProvider"):
            options.setdefault("device_id", device_id)
        if name == "CUDAExecutionProvider":
            # onnxruntime's CUDA provider runs float32 matrix products in TF32 (10-bit mantissa) unless told
            # otherwise; torch does not by default. An fp32 export is chosen for exactness, and the fp16 ones keep
            # their routers in float32: both are computed as torch computes them.
            options.setdefault("use_tf32", 0)
        resolved.append((name, options))
    if resolved[-1][0] != "CPUExecutionProvider":
        resolved.append(("CPUExecutionProvider", {}))  # for the few nodes a GPU provider leaves to the CPU
    return resolved


def session_options(primary: str, threads: int | None = None,
                    base: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """Options for ``primary``: DirectML requires memory patterns off and sequential execution."""
    so = base if base is not None else ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise InputError(f"`threads` must be >= 1, got {threads}")
        so.intra_op_num_threads = threads
    if primary == "DmlExecutionProvider":
        so.enable_mem_pattern = False
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return so


def check_active(session: ort.InferenceSession, requested: str, allow_fallback: bool) -> str:
    """The provider really running the graph; an error (or, if allowed, a warning) when it is not ``requested``."""
    active = session.get_providers()[0]
    if active != requested:
        msg = (f"onnxruntime could not start {requested} (its libraries or device failed to load) and would run "
               f"on {active}")
        if not allow_fallback:
            raise ProviderUnavailableError(msg + "; fix the install or pass allow_fallback=True to accept it")
        warnings.warn(msg + " (allow_fallback=True)", RuntimeWarning, stacklevel=3)
    return active
