"""Model calls replayed as CUDA graphs (onnxruntime ``enable_cuda_graph``): the exact sampler's full forward and
Fast-dLLM's cached steps.

A call runs every layer: at LLaDA-8B's shape that is about 1,070 kernels, most of them small, and launching them
one by one leaves the GPU idle between them (on an H100 a dual step at canvas 1088 took 10.8 ms run normally,
8.9 ms replayed). onnxruntime can capture a run into a CUDA graph and replay it, provided every input and output
of the run stays at the same device address with the same shape. So, per shape:

- the cache lives in persistent device buffers, one per layer and kind, that each refresh writes into (a refresh
  is an ordinary run, see ``KVCacheSession.refresh``: it runs once per block);
- a call's inputs are persistent buffers updated in place, and its head predicts a fixed number of rows (the
  fed block of a cached step; for a full forward the asked positions padded to a power of two, at least
  :data:`MIN_HEAD_ROWS`), of which the sampler's window is returned: the head reads the same weights for 1 row
  or 32, so padding costs nothing measurable, while a width per step would capture a graph per step;
- each (batch, canvas length, rows) gets its own graph id; onnxruntime captures on the first runs with that id
  and replays afterwards.

Captured shapes keep their buffers for the session's life (onnxruntime cannot release one graph), so at most
:data:`MAX_SHAPES` canvas shapes are pinned per session (later shapes run uncaptured), and only calls of at most
:data:`MAX_CAPTURED_TOKENS` fed tokens or asked rows are captured: a dual step feeds one block, while a prefix
step feeds the rest of the canvas, a length that changes with every block and a step bound by its arithmetic,
not by launches (at the 8B shape it costs more than a full forward).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from .contract import StepOutput

MAX_SHAPES = 8
MAX_CAPTURED_TOKENS = 128
MIN_HEAD_ROWS = 32  # a full forward's head rows are padded to a power of two, at least this
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
    """The pinned buffers and captured graphs of one ``enable_cuda_graph`` session: the cached steps of a KV-cache
    graph (``past``/``present``: its per-layer inputs and outputs) or the full forwards of a forward graph (none).

    A replay writes its inputs into the graph's buffers and reads its outputs back: one call at a time (a lock), so
    threads sharing a Pipeline take turns instead of overwriting each other's inputs."""

    def __init__(self, session: ort.InferenceSession, device_id: int, past: list[str], present: list[str],
                 dims: tuple[int, int], vocab_size: int):
        self.session, self.device_id = session, device_id
        self.past, self.present = past, present
        self.n_kv, self.head_dim = dims
        self.vocab_size = vocab_size
        logits = next(o for o in session.get_outputs() if o.name == "logits")
        self.dtype = np.float16 if logits.type == "tensor(float16)" else np.float32  # the graph's: cache, logits
        self.caches: dict[tuple[int, int], PinnedCache] = {}
        self.graphs: dict[tuple[int, int, int], _Graph] = {}
        self._lock = threading.Lock()

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
        """Whether a call feeding (or asking for) ``fed`` tokens is replayed as a graph (else it runs as an
        ordinary call)."""
        return 0 < fed <= MAX_CAPTURED_TOKENS

    def step(self, feeds: dict[str, np.ndarray], cache: PinnedCache, logits: bool) -> StepOutput:
        """Replay (or, on a shape's first runs, capture) the cached step; ``feeds["head_index"]`` may be narrower
        than the fed block: it is padded to the block's width and the outputs cut back."""
        batch, fed = feeds["input_ids"].shape
        return self._replay((*cache.shape, fed), feeds, "head_index", cache, logits)

    def forward(self, feeds: dict[str, np.ndarray], logits: bool) -> StepOutput | None:
        """Replay (or capture) a full forward, its ``feeds["positions"]`` padded to a power of two of at least
        :data:`MIN_HEAD_ROWS` rows; None when the shape is new and MAX_SHAPES shapes are captured already (the
        caller runs it uncaptured)."""
        batch, length = feeds["input_ids"].shape
        rows = max(MIN_HEAD_ROWS, 1 << (feeds["positions"].shape[1] - 1).bit_length())
        key = (batch, length, rows)
        if key not in self.graphs and len(self.graphs) >= MAX_SHAPES:
            return None
        return self._replay(key, feeds, "positions", [], logits)

    def _replay(self, key: tuple[int, int, int], feeds: dict[str, np.ndarray], index: str, past: list[Any],
                logits: bool) -> StepOutput:
        """Run the graph of ``key`` (batch, canvas length, head rows) with ``feeds``, the head's ``index`` input
        padded to the key's rows (repeating its last position) and the outputs cut back to the asked rows."""
        rows, count = key[2], feeds[index].shape[1]
        feeds = dict(feeds, **{index: np.pad(feeds[index], ((0, 0), (0, rows - count)), mode="edge")})
        with self._lock:
            graph = self.graphs.get(key) or self._new_graph(key, feeds, past)
            for name, value in feeds.items():
                graph.inputs[name].update_inplace(np.ascontiguousarray(value))
            self.session.run_with_iobinding(graph.binding, graph.run_options)
            out = graph.outputs
            full = out["logits"].numpy()[:, :count].astype(np.float32) if logits else None
            return StepOutput(out["top_ids"].numpy()[:, :count], out["top_prob"].numpy()[:, :count], full)

    def _new_graph(self, key: tuple[int, int, int], feeds: dict[str, np.ndarray], past: list[Any]) -> _Graph:
        """Fixed device buffers, bound once, for a new shape and its own graph id."""
        batch, _, rows = key
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("gpu_graph_id", str(len(self.graphs) + 1))
        graph = _Graph(run_options, self.session.io_binding(),
                       {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", self.device_id)
                        for name, value in feeds.items()})
        graph.outputs = {"top_ids": self._device((batch, rows), np.int64),
                         "top_prob": self._device((batch, rows), np.float32),
                         "logits": self._device((batch, rows, self.vocab_size), self.dtype),
                         **{name: self._device((batch, self.n_kv, rows, self.head_dim), self.dtype)
                            for name in self.present}}
        for name, value in graph.inputs.items():
            graph.binding.bind_ortvalue_input(name, value)
        for name, buffer in zip(self.past, past):
            graph.binding.bind_ortvalue_input(name, buffer)
        for name, value in graph.outputs.items():
            graph.binding.bind_ortvalue_output(name, value)
        self.graphs[key] = graph
        return graph
