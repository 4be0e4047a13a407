"""Execution-provider selection and the session options each provider needs.

onnxruntime silently runs on the CPU when a requested provider is missing or fails to load; an app that asked
for a GPU should hear about it. So a missing provider is an error naming the package that brings it, unless the
caller allowed a fallback, which is then reported.
"""

from __future__ import annotations

import functools
import platform
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
EXACT_INT8_PRODUCTS = "session.x64quantprecision"  # onnxruntime: int8 weights as uint8, non-saturating kernels
X86 = ("x86_64", "amd64", "i386", "i686", "x86")


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


@functools.lru_cache(maxsize=1)
def int8_products_saturate() -> bool:
    """Whether onnxruntime's default int8 matrix products would clamp on this CPU.

    On x86 CPUs without VNNI, onnxruntime multiplies uint8 activations by int8 weights with VPMADDUBSW, whose
    pairwise sums saturate at 16 bits, and an int8 export's logits drift: with those sums emulated in the graph, the
    embedded model's int8 export moves the masked-token loss +5.8% from torch's (``verify`` fails it at 2%)
    against +0.13% with exact sums (``python -m bench.int8_saturation``). ``session.x64quantprecision`` turns the
    weights to uint8 at load, for exact uint8 x uint8 kernels; but onnxruntime applies it on every AVX2 CPU, VNNI
    ones included, where it only costs time (a 100M-parameter int8 step 1.3x-1.4x as long on an AVX-512 VNNI CPU).
    So it is set only where VNNI is missing: x86 CPUs whose flags (Linux's ``/proc/cpuinfo``, else numpy's CPU
    feature table, which names AVX-512 VNNI but not AVX-VNNI) show neither; flags that cannot be read count as
    missing (exact and slower rather than fast and wrong)."""
    if platform.machine().lower() not in X86:
        return False
    return not {"avx512_vnni", "avx_vnni"} & _cpu_flags()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        return set()
    return {"avx512_vnni"} if __cpu_features__.get("AVX512VNNI") else set()


def session_options(primary: str, threads: int | None = None,
                    base: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """Options for ``primary``: DirectML requires memory patterns off and sequential execution; on a CPU whose
    int8 products would clamp, the exact int8 kernels (:func:`int8_products_saturate`) unless ``base`` says."""
    so = base if base is not None else ort.SessionOptions()
    if int8_products_saturate() and not _has_entry(so, EXACT_INT8_PRODUCTS):
        so.add_session_config_entry(EXACT_INT8_PRODUCTS, "1")
    if threads is not None:
        if threads < 1:
            raise InputError(f"`threads` must be >= 1, got {threads}")
        so.intra_op_num_threads = threads
    if primary == "DmlExecutionProvider":
        so.enable_mem_pattern = False
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return so


def _has_entry(so: ort.SessionOptions, key: str) -> bool:
    try:
        so.get_session_config_entry(key)
    except RuntimeError:  # onnxruntime's answer for a key never set
        return False
    return True


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
