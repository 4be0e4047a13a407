"""Cached steps replayed as CUDA graphs (onnxruntime ``enable_cuda_graph``).

A cached step runs one block of tokens through every layer: at LLaDA-8B's shape that is about 1,070 kernels,
most of them small, and launching them one by one costs more than running them (on an H100 a dual step at canvas
1088 took 10.8 ms run normally, 8.9 ms replayed). onnxruntime can capture a run into a CUDA graph and replay it,
provided every input and output of the run stays at the same device address with the same shape. So, per canvas
shape:

- the cache lives in persistent device buffers, one per layer and kind, that each refresh writes into (a refresh
  is an ordinary run, see ``KVCacheSession.refresh``: it runs once per block);
- a step's inputs are persistent buffers updated in place, and its head predicts all fed positions (the head
  reads the same weights for 1 row or 32, so padding costs nothing measurable), of which the sampler's window is
  returned;
- each (batch, canvas length, fed length) gets its own graph id; onnxruntime captures on the first runs with that
  id and replays afterwards.

Captured shapes keep their buffers for the session's life (onnxruntime cannot release one graph), so at most
:data:`MAX_SHAPES` canvas shapes are pinned (later shapes run uncaptured), and only steps of at most
:data:`MAX_CAPTURED_TOKENS` fed tokens are captured: a dual step feeds one block, while a prefix step feeds the
rest of the canvas, a length that changes with every block and a step bound by its arithmetic, not by launches
(at the 8B shape it costs more than a full forward).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from .session import StepOutput

MAX_SHAPES = 8
MAX_CAPTURED_TOKENS = 128
UNCAPTURED = ort.RunOptions()  # an ordinary run of a session that has CUDA graphs enabled
UNCAPTURED.add_run_config_entry("gpu_graph_id", "-1")


class PinnedCache(list):
    """The per-layer cache buffers of one canvas shape: refreshes write into them, captured steps read them.

    So a refresh overwrites the cache that an earlier refresh of the same shape returned: one generation at a time
    per session, as the sampler runs.
    """

    def __init__(self, values: list[Any], shape: tuple[int, int]):
        super().__init__(values)
        self.shape = shape  # (batch, canvas length)


@dataclass
class _Graph:
    run_options: ort.RunOptions
    binding: Any
    inputs: dict[str, ort.OrtValue]
    outputs: dict[str, ort.OrtValue] = field(default_factory=dict)


class CapturedSteps:
    """The pinned buffers and captured graphs of one ``enable_cuda_graph`` session."""

    def __init__(self, session: ort.InferenceSession, device_id: int, past: list[str], present: list[str],
                 dims: tuple[int, int], dtype, vocab_size: int):
        self.session, self.device_id = session, device_id
        self.past, self.present = past, present
        self.n_kv, self.head_dim = dims
        self.dtype, self.vocab_size = dtype, vocab_size  # the graph's float type: cache and logits
        self.caches: dict[tuple[int, int], PinnedCache] = {}
        self.graphs: dict[tuple[int, int, int], _Graph] = {}

    def _device(self, shape: tuple[int, ...], dtype) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cuda", self.device_id)

    def pinned_cache(self, batch: int, length: int) -> PinnedCache | None:
        """The buffers a refresh of a ``[batch, length]`` canvas writes into; None once MAX_SHAPES are pinned."""
        key = (batch, length)
        if key not in self.caches:
            if len(self.caches) == MAX_SHAPES:
                return None
            shape = (batch, self.n_kv, length, self.head_dim)
            self.caches[key] = PinnedCache([self._device(shape, self.dtype) for _ in self.past], key)
        return self.caches[key]

    @staticmethod
    def captures(fed: int) -> bool:
        """Whether a step feeding ``fed`` tokens is replayed as a graph (else it runs as an ordinary call)."""
        return fed <= MAX_CAPTURED_TOKENS

    def step(self, feeds: dict[str, np.ndarray], cache: PinnedCache, logits: bool) -> StepOutput:
        """Replay (or, on a shape's first runs, capture) the step; ``feeds["head_index"]`` may be narrower than
        the fed block: it is padded to the block's width and the outputs cut back."""
        ids, head = feeds["input_ids"], feeds["head_index"]
        batch, fed = ids.shape
        count = head.shape[1]
        feeds = dict(feeds, head_index=np.pad(head, ((0, 0), (0, fed - count)), mode="edge"))
        key = (*cache.shape, fed)
        graph = self.graphs.get(key) or self._new_graph(key, feeds, cache)
        for name, value in feeds.items():
            graph.inputs[name].update_inplace(np.ascontiguousarray(value))
        self.session.run_with_iobinding(graph.binding, graph.run_options)
        out = graph.outputs
        full = out["logits"].numpy()[:, :count].astype(np.float32) if logits else None
        return StepOutput(out["top_ids"].numpy()[:, :count], out["top_prob"].numpy()[:, :count], full)

    def _new_graph(self, key: tuple[int, int, int], feeds: dict[str, np.ndarray], cache: PinnedCache) -> _Graph:
        """Fixed device buffers, bound once, for a new step shape and its own graph id."""
        batch, _, fed = key
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("gpu_graph_id", str(len(self.graphs) + 1))
        graph = _Graph(run_options, self.session.io_binding(),
                       {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", self.device_id)
                        for name, value in feeds.items()})
        graph.outputs = {"top_ids": self._device((batch, fed), np.int64),
                         "top_prob": self._device((batch, fed), np.float32),
                         "logits": self._device((batch, fed, self.vocab_size), self.dtype),
                         **{name: self._device((batch, self.n_kv, fed, self.head_dim), self.dtype)
                            for name in self.present}}
        for name, value in graph.inputs.items():
            graph.binding.bind_ortvalue_input(name, value)
        for name, buffer in zip(self.past, cache):
            graph.binding.bind_ortvalue_input(name, buffer)
        for name, value in graph.outputs.items():
            graph.binding.bind_ortvalue_output(name, value)
        self.graphs[key] = graph
        return graph
