"""One onnxruntime session over an exported graph, and the per-step call the sampler makes.

The sampler asks for the window of positions it can commit and, on the greedy ``low_confidence`` path, only for
``top_ids``/``top_prob``. On CUDA the call goes through IOBinding: ``logits`` stays in device memory unless the
step needs it, and only the two ``[batch, count]`` summaries cross to the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from . import providers as _providers
from .manifest import Manifest, NotAnExportError


@dataclass
class StepOutput:
    top_ids: np.ndarray  # int64 [batch, count]
    top_prob: np.ndarray  # float32 [batch, count]
    logits: np.ndarray | None  # float32 [batch, count, vocab], only when asked for


def open_session(path: Path, provider: _providers.ProviderSpec, *, device_id: int, threads: int | None,
                 session_options: ort.SessionOptions | None, allow_fallback: bool) -> tuple[ort.InferenceSession, str]:
    """An onnxruntime session on the asked provider, and the provider that really runs it."""
    chosen = _providers.resolve(provider, device_id)
    so = _providers.session_options(chosen[0][0], threads, session_options)
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=chosen)
    except Exception as e:  # onnxruntime raises its own exception types for a damaged file
        raise NotAnExportError(f"onnxruntime could not load {path}: {e}") from None
    return session, _providers.check_active(session, chosen[0][0], allow_fallback)


class GraphSession:
    """An exported LLaDA graph in onnxruntime; build it once and call :meth:`run` every step."""

    def __init__(self, manifest: Manifest, provider: _providers.ProviderSpec = "cpu", *, device_id: int = 0,
                 threads: int | None = None, session_options: ort.SessionOptions | None = None,
                 allow_fallback: bool = False):
        self.manifest = manifest
        self.session, self.provider = open_session(manifest.graph_path, provider, device_id=device_id,
                                                   threads=threads, session_options=session_options,
                                                   allow_fallback=allow_fallback)
        names_in = tuple(i.name for i in self.session.get_inputs())
        names_out = tuple(o.name for o in self.session.get_outputs())
        if set(names_in) != set(manifest.inputs) or not set(manifest.outputs) <= set(names_out):
            raise NotAnExportError(
                f"{manifest.directory}: the graph's inputs {names_in} / outputs {names_out} do not match "
                f"llada_onnx.json ({manifest.inputs} / {manifest.outputs}); the manifest is stale, re-export")
        self._in = dict(zip(("input_ids", "attention_mask", "positions"), manifest.inputs))
        self._out = dict(zip(("logits", "top_ids", "top_prob"), manifest.outputs))
        self._device = {"CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml"}.get(self.provider)
        self._device_id = device_id

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray,
            *, logits: bool = False) -> StepOutput:
        feeds = {self._in["input_ids"]: input_ids, self._in["attention_mask"]: attention_mask,
                 self._in["positions"]: positions}
        if self._device == "cuda":
            return self._run_bound(feeds, logits)
        names = [self._out["top_ids"], self._out["top_prob"]] + ([self._out["logits"]] if logits else [])
        outs = self.session.run(names, feeds)
        return StepOutput(outs[0], outs[1], outs[2].astype(np.float32, copy=False) if logits else None)

    def _run_bound(self, feeds: dict[str, Any], logits: bool) -> StepOutput:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", self._device_id))
        binding.bind_output(self._out["top_ids"], "cpu")
        binding.bind_output(self._out["top_prob"], "cpu")
        binding.bind_output(self._out["logits"], "cpu" if logits else "cuda", 0 if logits else self._device_id)
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()  # in binding order
        return StepOutput(outs[0].numpy(), outs[1].numpy(),
                          outs[2].numpy().astype(np.float32, copy=False) if logits else None)
