"""The block-wise KV-cache graph (``cache.onnx``) in onnxruntime: refreshes and cached steps (Fast-dLLM).

A *refresh* feeds the whole canvas (against an empty past) and returns, besides the window's predictions, every
layer's post-RoPE keys and values: the cache. A *cached step* feeds only the current block (``dual`` cache) or the
block and everything after it (``prefix`` cache) and attends to the cache for all other positions. The cache is
approximate: it is as old as the last refresh. On CUDA it never leaves the device (IOBinding, OrtValues passed
from one call to the next) and cached steps are replayed as CUDA graphs (:mod:`.captured_steps`); on the CPU the
arrays onnxruntime returns are fed back as they are, without copies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from . import providers as _providers
from .captured_steps import UNCAPTURED, CapturedSteps, PinnedCache
from .errors import InputError
from .contract import KV_CACHE, StepOutput
from .manifest import Manifest
from .session import PastInputs, check_graph, open_capturing_session, run_step

Cache = list[Any]  # per layer keys then values [B, n_kv_heads, L, head_dim]: numpy arrays, OrtValues on CUDA


class KVCacheSession:
    """``cuda_graphs``: on the CUDA provider, replay cached steps as CUDA graphs (default); ignored elsewhere."""

    def __init__(self, manifest: Manifest, provider: _providers.ProviderSpec = "cpu", *, device_id: int = 0,
                 threads: int | None = None, session_options: ort.SessionOptions | None = None,
                 allow_fallback: bool = False, cuda_graphs: bool = True):
        if not manifest.cache_graph:
            raise InputError(f"{manifest.directory} has no KV-cache graph: re-export with `llada-onnx export "
                             "--cache` to use cache='prefix' or 'dual'")
        self.manifest = manifest
        path = manifest.directory / manifest.cache_graph
        self.session, self.provider, graphs = open_capturing_session(
            path, provider, cuda_graphs=cuda_graphs, device_id=device_id, threads=threads,
            session_options=session_options, allow_fallback=allow_fallback)
        sizes = manifest.sizes
        check_graph(self.session, KV_CACHE, sizes.n_layers, path)
        self._present = list(KV_CACHE.layer_output_names(sizes.n_layers))
        self._device = "cuda" if self.provider == "CUDAExecutionProvider" else None
        self._device_id = device_id
        self.past = PastInputs(self.session, list(KV_CACHE.layer_input_names(sizes.n_layers)), sizes,
                               device_id if self._device else None)
        self._captured = (CapturedSteps(self.session, device_id, self.past.names, self._present, self.past.dims,
                                        manifest.vocab_size) if graphs else None)

    def refresh(self, canvas: np.ndarray, attention_mask: np.ndarray, window: np.ndarray,
                *, logits: bool) -> tuple[StepOutput, Cache]:
        """Predictions for ``window`` (canvas positions ``[B, c]``) from the whole canvas, and a fresh cache."""
        batch, length = canvas.shape
        positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length))
        pinned = self._captured.pinned_cache(batch, length) if self._captured else None
        out, cache = self._run(canvas, attention_mask, positions, window, self.past.empty(batch),
                               logits, self._present, into=pinned)
        return out, cache if pinned is None else pinned

    def step(self, canvas: np.ndarray, attention_mask: np.ndarray, fed_start: int, fed_end: int,
             window: np.ndarray, cache: Cache, *, logits: bool) -> StepOutput:
        """Predictions for ``window`` from the tokens at ``[fed_start, fed_end)`` against ``cache``."""
        batch = canvas.shape[0]
        positions = np.broadcast_to(np.arange(fed_start, fed_end, dtype=np.int64), (batch, fed_end - fed_start))
        ids = np.ascontiguousarray(canvas[:, fed_start:fed_end])
        if isinstance(cache, PinnedCache) and self._captured.captures(fed_end - fed_start):
            return self._captured.step(self._feeds(ids, attention_mask, positions, window - fed_start), cache, logits)
        out, _ = self._run(ids, attention_mask, positions, window - fed_start, cache, logits, ())
        return out

    @staticmethod
    def _feeds(ids, mask, positions, head_index) -> dict[str, np.ndarray]:
        return {"input_ids": ids, "attention_mask": mask, "positions": np.ascontiguousarray(positions),
                "head_index": np.ascontiguousarray(head_index, dtype=np.int64)}

    def _run(self, ids, mask, positions, head_index, past: Cache, logits: bool,
             presents: list[str] | tuple[()], into: PinnedCache | None = None) -> tuple[StepOutput, Cache]:
        """An uncaptured call (a refresh writes its cache ``into`` pinned buffers when given)."""
        return run_step(self.session, self._feeds(ids, mask, positions, head_index), logits=logits,
                        cuda_device=self._device_id if self._device else None,
                        kept_inputs=dict(zip(self.past.names, past)), kept_outputs=tuple(presents), into=into,
                        run_options=UNCAPTURED if self._captured else None)
