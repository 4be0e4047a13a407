"""One onnxruntime session over an exported graph, and the per-step call the sampler makes.

The sampler asks for the window of positions it can commit and, on the greedy ``low_confidence`` path, only for
``top_ids``/``top_prob``. On CUDA the call goes through IOBinding: ``logits`` stays in device memory unless the
step needs it, and only the two ``[batch, count]`` summaries cross to the host; the exact sampler's full forwards
are replayed as CUDA graphs (:mod:`.captured_steps`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from . import providers as _providers
from .captured_steps import UNCAPTURED, CapturedSteps
from .contract import GRAPH_KINDS, GraphKind, ModelSizes, StepOutput
from .errors import LladaOnnxError, NotAnExportError
from .manifest import Manifest


def open_session(path: Path, provider: _providers.ProviderSpec, *, device_id: int, threads: int | None,
                 session_options: ort.SessionOptions | None, allow_fallback: bool) -> tuple[ort.InferenceSession, str]:
    """An onnxruntime session on the asked provider, and the provider that really runs it."""
    chosen = _providers.resolve(provider, device_id)
    so = _providers.session_options(chosen[0][0], threads, session_options)
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=chosen)
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidProtobuf, ...)
        known = load_error(path, chosen[0][0], e)
        if known is None:
            raise
        raise known from None
    return session, _providers.check_active(session, chosen[0][0], allow_fallback)


def open_capturing_session(path: Path, provider: _providers.ProviderSpec, *, cuda_graphs: bool, device_id: int,
                           **kwargs) -> tuple[ort.InferenceSession, str, bool]:
    """:func:`open_session`, with onnxruntime's ``enable_cuda_graph`` when ``cuda_graphs`` and the provider is
    CUDA; the third value says whether the session can capture. onnxruntime refuses CUDA graphs when a node of the
    graph runs outside the CUDA provider: the session is then opened without them (with a warning)."""
    chosen = _providers.resolve(provider, device_id)
    if not (cuda_graphs and chosen[0][0] == "CUDAExecutionProvider"):
        return (*open_session(path, chosen, device_id=device_id, **kwargs), False)
    try:
        session, active = open_session(path, [(chosen[0][0], dict(chosen[0][1], enable_cuda_graph="1")),
                                              *chosen[1:]], device_id=device_id, **kwargs)
    except Exception as e:  # onnxruntime's own error when a node cannot run inside a CUDA graph
        if "graph" not in str(e).lower():
            raise
        warnings.warn(f"CUDA graphs are off for {path}: {e}", RuntimeWarning, stacklevel=3)
        return (*open_session(path, chosen, device_id=device_id, **kwargs), False)
    return session, active, active == "CUDAExecutionProvider"  # not when onnxruntime fell back (allow_fallback)


# What onnxruntime says when it loads a graph, told apart by its message: onnxruntime has no finer error types.
_DAMAGED = ("Protobuf parsing failed", "External data", "external data", "Deserialize tensor", "out of bounds")
_UNSUPPORTED = ("is not a registered function/op", "Could not find an implementation", "NOT_IMPLEMENTED")
_LIBRARY = ("Failed to load library", "LoadLibrary", "cannot open shared object file", "library not found")


def load_error(path: Path, provider: str, error: Exception) -> Exception | None:
    """The package's error for an onnxruntime load failure it recognises (None: a failure it cannot explain,
    left as it is): a damaged or incomplete export, an operator this onnxruntime build lacks, or an execution
    provider whose libraries failed to load."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if any(s in detail for s in _LIBRARY):
        return _providers.ProviderUnavailableError(
            f"onnxruntime could not load the libraries of {provider}: {detail}; install the libraries it needs "
            "(for CUDA: the CUDA and cuDNN versions this onnxruntime-gpu was built for) or choose another provider")
    if any(s in detail for s in _DAMAGED):
        return NotAnExportError(f"{path} or its weight file is damaged or incomplete ({detail}); copy the export "
                                "again or re-export it")
    if any(s in detail for s in _UNSUPPORTED):
        return UnsupportedGraphError(
            f"onnxruntime {ort.__version__} on {provider} cannot run {path.name}: {detail}; use a newer "
            "onnxruntime, or an export for this provider (e.g. --fusion none for providers without onnxruntime's "
            "contrib ops)")
    return None


class UnsupportedGraphError(LladaOnnxError, RuntimeError):
    """The export uses an operator this onnxruntime build or provider does not have (or not correctly)."""


FIRST_EXACT_CPU_MOE = (1, 32)  # onnxruntime 1.31.1's CPU MoE kernel renormalised the top-k weights (measured)


def check_moe_kernel(manifest: Manifest, provider: str) -> None:
    """Refuse a fused-MoE export on a kernel that would run it wrongly: quantized experts (``QMoE``) laid out for
    another provider's kernel (``experts_layout``: fp32 exports for the CPU, fp16 ones for CUDA), or a CPU kernel
    that computes a different routing."""
    quantized = manifest.raw.get("moe") == "fused" and manifest.variant != "exact"
    layout = manifest.raw.get("experts_layout") or "cpu"
    if quantized and provider == "CUDAExecutionProvider" and layout != "cuda":
        raise UnsupportedGraphError(
            "this export's quantized experts are laid out for onnxruntime's CPU kernel, and the CUDA kernel would "
            "compute wrong tokens with them: run it with --provider cpu, or quantize an fp16 export for CUDA")
    if quantized and provider != "CUDAExecutionProvider" and layout == "cuda":
        raise UnsupportedGraphError(
            "this export's quantized experts are laid out for onnxruntime's CUDA kernel: run it with --provider "
            "cuda, or quantize an fp32 export for the CPU")
    version = tuple(int(p) for p in ort.__version__.split(".")[:2] if p.isdigit())
    if manifest.raw.get("moe") == "fused" and provider == "CPUExecutionProvider" and version < FIRST_EXACT_CPU_MOE:
        raise UnsupportedGraphError(
            f"onnxruntime {ort.__version__}'s CPU MoE kernel mixes the experts with renormalised weights, not the "
            "model's; use onnxruntime >= 1.32 on the CPU, or an export made with --moe decomposed")


class PastInputs:
    """A graph's per-layer past inputs (keys/values fed back from an earlier call): their dtype, where they live
    (numpy arrays on the host; OrtValues on the device under CUDA, so state never crosses to the host by itself),
    and the empty past of each batch size."""

    def __init__(self, session: ort.InferenceSession, names: list[str], sizes: ModelSizes, cuda_device: int | None):
        self.names, self.cuda_device = names, cuda_device
        self.dims = (sizes.n_kv_heads, sizes.head_dim)
        kind = next((i.type for i in session.get_inputs() if names and i.name == names[0]), "")
        self.dtype = np.float16 if kind == "tensor(float16)" else np.float32
        self._empty: dict[int, list[Any]] = {}

    def to_device(self, array: np.ndarray) -> Any:
        """``array`` where the past lives."""
        return array if self.cuda_device is None else ort.OrtValue.ortvalue_from_numpy(array, "cuda",
                                                                                         self.cuda_device)

    def to_host(self, value: Any) -> np.ndarray:
        return value if self.cuda_device is None else value.numpy()

    def empty(self, batch: int) -> list[Any]:
        """Per layer, keys and values of no position (the last batch size's kept)."""
        if batch not in self._empty:
            empty = np.zeros((batch, self.dims[0], 0, self.dims[1]), dtype=self.dtype)
            self._empty = {batch: [self.to_device(empty)] * len(self.names)}
        return self._empty[batch]


class GraphSession:
    """An exported LLaDA graph in onnxruntime; build it once and call :meth:`run` every step.

    ``cuda_graphs``: on the CUDA provider, replay full forwards of up to ``MAX_CAPTURED_TOKENS`` asked positions
    as CUDA graphs (:mod:`.captured_steps`); a block-diffusion graph, whose past grows with every block, runs
    uncaptured."""

    def __init__(self, manifest: Manifest, provider: _providers.ProviderSpec = "cpu", *, device_id: int = 0,
                 threads: int | None = None, session_options: ort.SessionOptions | None = None,
                 allow_fallback: bool = False, cuda_graphs: bool = True):
        self.manifest = manifest
        # How the session was opened: the export's other graphs open the same way (see Pipeline.kv_cache).
        self.opened_with = dict(provider=provider, device_id=device_id, threads=threads,
                                session_options=session_options, allow_fallback=allow_fallback,
                                cuda_graphs=cuda_graphs)
        requested = _providers.resolve(provider, device_id)[0][0]
        check_moe_kernel(manifest, requested)  # before any session is opened for a graph that would be refused
        self.session, self.provider, captures = open_capturing_session(
            manifest.graph_path, provider, cuda_graphs=cuda_graphs and not manifest.block_diffusion,
            device_id=device_id, threads=threads, session_options=session_options, allow_fallback=allow_fallback)
        if self.provider != requested:  # onnxruntime fell back (allow_fallback)
            check_moe_kernel(manifest, self.provider)
        kind, n_layers = GRAPH_KINDS[manifest.main_kind], manifest.sizes.n_layers
        check_graph(self.session, kind, n_layers, manifest.graph_path)
        self._device = {"CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml"}.get(self.provider)
        self._device_id = device_id
        self._present = kind.layer_output_names(n_layers)
        self.past = PastInputs(self.session, list(kind.layer_input_names(n_layers)), manifest.sizes, self._cuda)
        self._captured = (CapturedSteps(self.session, device_id, [], [], self.past.dims, manifest.vocab_size)
                          if captures else None)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray,
            *, logits: bool = False, block_length: int | None = None) -> StepOutput:
        """The main graph at ``positions``; a block-diffusion graph also takes ``block_length`` (and an empty
        past: the full forward)."""
        if block_length is not None:
            nothing = np.zeros((len(input_ids), 0), dtype=np.int64)
            return self.run_block(input_ids, attention_mask, positions, block_length, nothing,
                                  self.past.empty(len(input_ids)), logits=logits, presents=False)[0]
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "positions": positions}
        if self._captured and self._captured.captures(positions.shape[1]):
            out = self._captured.forward(feeds, logits)
            if out is not None:
                return out
        return run_step(self.session, feeds, logits=logits, cuda_device=self._cuda,
                        run_options=UNCAPTURED if self._captured else None)[0]

    def run_block(self, input_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray,
                  block_length: int, cached_mask: np.ndarray, past: list[Any], *, logits: bool,
                  presents: bool = True) -> tuple[StepOutput, list[Any]]:
        """A ``block_forward`` call: the fed ``input_ids`` (``attention_mask``: their padding) against ``past``
        (per layer keys then values: numpy arrays, OrtValues on CUDA; ``cached_mask``: its padding); returns the
        predictions at ``positions`` and, with ``presents``, the fed tokens' keys/values in the same form."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "positions": positions,
                 "block_length": np.array(block_length, dtype=np.int64), "cached_mask": cached_mask}
        return run_step(self.session, feeds, logits=logits, cuda_device=self._cuda,
                        kept_inputs=dict(zip(self.past.names, past)),
                        kept_outputs=self._present if presents else ())

    @property
    def _cuda(self) -> int | None:
        return self._device_id if self._device == "cuda" else None


def check_graph(session: ort.InferenceSession, kind: GraphKind, n_layers: int, path: Path) -> None:
    """The loaded graph has exactly the inputs and outputs the contract gives its kind."""
    names_in = tuple(i.name for i in session.get_inputs())
    names_out = tuple(o.name for o in session.get_outputs())
    if set(names_in) != set(kind.input_names(n_layers)) or set(names_out) != set(kind.output_names(n_layers)):
        raise NotAnExportError(
            f"{path}: its inputs {list(names_in)[:6]} / outputs {list(names_out)[:6]} are not those of a "
            f"{kind.name} graph of this llada-onnx (runtime/contract.py); re-export")


def run_step(session: ort.InferenceSession, feeds: dict[str, np.ndarray], *, logits: bool, cuda_device: int | None,
             kept_inputs: dict[str, Any] | None = None,
             kept_outputs: tuple[str, ...] = (), into: list[Any] | None = None,
             run_options: ort.RunOptions | None = None) -> tuple[StepOutput, list[Any]]:
    """One call of a sampler graph; returns its summaries and the ``kept_outputs``.

    On CUDA (``cuda_device``) the call goes through
    IOBinding: ``top_ids``/``top_prob`` come to the host, ``logits`` only when asked for, and ``kept_outputs``
    stay on the device as OrtValues (written ``into`` the given device buffers, if any), which is also what
    ``kept_inputs`` (state fed back, e.g. a KV cache) must be there. On the CPU both are numpy arrays, passed
    without copies.
    """
    kept_inputs = kept_inputs or {}
    if cuda_device is None:
        wanted = ["top_ids", "top_prob", *kept_outputs] + (["logits"] if logits else [])
        outs = session.run(wanted, {**feeds, **kept_inputs}, run_options)
        kept = outs[2:2 + len(kept_outputs)]
        full = outs[-1].astype(np.float32, copy=False) if logits else None
        return StepOutput(outs[0], outs[1], full), kept
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", cuda_device))
    for name, value in kept_inputs.items():
        if not isinstance(value, ort.OrtValue):
            raise TypeError(f"{name} on CUDA must be the OrtValue an earlier call returned")
        binding.bind_ortvalue_input(name, value)
    binding.bind_output("top_ids", "cpu")
    binding.bind_output("top_prob", "cpu")
    for i, name in enumerate(kept_outputs):
        if into is None:
            binding.bind_output(name, "cuda", cuda_device)
        else:
            binding.bind_ortvalue_output(name, into[i])
    binding.bind_output("logits", "cpu" if logits else "cuda", 0 if logits else cuda_device)
    session.run_with_iobinding(binding, run_options)
    outs = binding.get_outputs()  # in binding order
    full = outs[-1].numpy().astype(np.float32, copy=False) if logits else None
    return StepOutput(outs[0].numpy(), outs[1].numpy(), full), outs[2:2 + len(kept_outputs)]
