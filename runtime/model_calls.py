"""The sampler's first phase: the model call of a step, which decides what the graphs are fed.

A :class:`ModelCall` gets the whole canvas and the positions to predict and returns their summaries
(:class:`~.session.StepOutput`); what it runs for that is its own business:

- :class:`FullForward`: the whole canvas through the forward graph, every step (the exact sampler);
- :class:`CachedForward`: Fast-dLLM's block-wise KV cache on the ``kv_cache`` graph. It refreshes the cache
  with a full pass at each block's first step (and every ``refresh_every`` steps), and in between feeds only the
  current block (``dual``) or the block and everything after it (``prefix``) against the cache.

Device details (IOBinding, pinned cache buffers, CUDA graphs) live in the sessions below these calls, so the
sampler loop never asks which provider runs it. Each call reports the seconds it spent in onnxruntime.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from .kv_cache import Cache, KVCacheSession
from .contract import StepOutput
from .session import GraphSession


class ModelCall(Protocol):
    seconds: float  # time spent in the last call

    def __call__(self, canvas: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray, *, step: int,
                 window_start: int, block_end: int, logits: bool) -> StepOutput:
        """Predictions at ``positions`` ``[B, c]`` of ``canvas`` ``[B, L]``; ``step`` counts within the block
        (0 = its first), ``[window_start, block_end)`` is the span the step can commit."""


class FullForward:
    def __init__(self, graph: GraphSession):
        self.graph, self.seconds = graph, 0.0

    def __call__(self, canvas, attention_mask, positions, *, step, window_start, block_end, logits) -> StepOutput:
        start = time.perf_counter()
        out = self.graph.run(canvas, attention_mask, positions, logits=logits)
        self.seconds = time.perf_counter() - start
        return out


class CachedForward:
    """``mode`` "dual" or "prefix"; the cache lives from a block's refresh to the next refresh."""

    def __init__(self, cache: KVCacheSession, mode: str, refresh_every: int | None):
        self.cache, self.mode, self.refresh_every = cache, mode, refresh_every
        self.kv: Cache | None = None
        self.seconds = 0.0

    def refreshes(self, step: int) -> bool:
        return step == 0 or bool(self.refresh_every and step % self.refresh_every == 0)

    def __call__(self, canvas, attention_mask, positions, *, step, window_start, block_end, logits) -> StepOutput:
        start = time.perf_counter()
        if self.refreshes(step):
            out, self.kv = self.cache.refresh(canvas, attention_mask, positions, logits=logits)
        else:
            fed_end = block_end if self.mode == "dual" else canvas.shape[1]
            out = self.cache.step(canvas, attention_mask, window_start, fed_end, positions, self.kv, logits=logits)
        self.seconds = time.perf_counter() - start
        return out
