"""The block-diffusion sampler (LLaDA2) in NumPy, driving a ``block_forward`` graph: token-exact with the torch
reference (``llada_onnx.models.block_sampler``, whose docstring gives the algorithm and its documented
differences from the official code) given the same noise.

Each step runs the current block against the cached keys/values of the finished ones (:mod:`.block_cache`; with
``cache="none"``, the whole canvas up to the current blocks' end) and asks the graph for the current block's
positions only; at temperature 0 the graph's ``top_ids``/``top_prob`` are the proposal, so no vocabulary-sized
tensor reaches the host. Rows keep their own block grids (counted from each row's first token) and advance block
by block together.

Streaming: a block's tokens are final once the block is done (its last mask filled and its editing steps over):
each :class:`BlockStepInfo` says, per row, up to which canvas position the tokens are final.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .block_cache import BlockCache
from .block_settings import BlockSettings
from .errors import InputError
from .noise import Noise
from .session import GraphSession, StepOutput


@dataclass
class BlockStepInfo:
    """What a callback sees after every model call; return ``False`` to stop."""

    block: int  # the generation's block number, 0 = each row's first generated block
    step: int  # within the block
    canvas: np.ndarray  # [batch, length], the live canvas
    committed: list[np.ndarray]  # per row, the canvas positions written in this step (commits and edits)
    final_until: list[int]  # per row: canvas positions before this one are final
    prompt_width: int
    model_seconds: float


BlockCallback = Callable[[BlockStepInfo], Optional[bool]]


def propose(out: StepOutput, s: BlockSettings, noise: Noise) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and their probabilities ``[rows, n]`` (the torch reference's ``propose``)."""
    if s.temperature == 0:
        return out.top_ids, out.top_prob
    logits = out.logits.astype(np.float32)
    if s.temperature != 1.0:
        logits = logits / np.float32(s.temperature)
    if s.top_k is not None:
        kth = -np.sort(-logits, axis=-1)[..., s.top_k - 1:s.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    if s.top_p is not None and s.top_p < 1:
        index = np.argsort(-logits, axis=-1, kind="stable")
        ordered = np.take_along_axis(logits, index, axis=-1)
        beyond = np.cumsum(_softmax(ordered), axis=-1) > s.top_p
        beyond[..., 1:] = beyond[..., :-1].copy()
        beyond[..., 0] = False
        drop = np.zeros_like(beyond)
        np.put_along_axis(drop, index, beyond, axis=-1)
        logits = np.where(drop, -np.inf, logits)
    probs = _softmax(logits)
    u = noise.gumbel_uniforms(logits.shape)
    x0 = np.argmax(logits.astype(np.float64) - np.log(-np.log(u)), axis=-1)
    return x0, np.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def generate_block_ids(graph: GraphSession, prompt: np.ndarray, attention_mask: np.ndarray | None,
                       settings: BlockSettings, *, noise: Noise, callback: BlockCallback | None = None) -> np.ndarray:
    """The canvas ``[batch, length]`` (left padding kept; positions never reached still masked)."""
    m = graph.manifest
    mask_id, eos_id, pad_id = m.id("mask_token_id"), m.id("eos_token_id"), m.id("pad_token_id")
    s, b = settings, settings.block_length
    prompt = np.asarray(prompt, dtype=np.int64)
    rows, width = prompt.shape
    mask_in = np.ones_like(prompt) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    layout = s.layout(mask_in.sum(axis=1).tolist(), width)
    total = layout.total
    if total > m.max_sequence_length:
        raise InputError(f"prompt + `gen_length` {s.gen_length}, in blocks of {b}, needs {total} positions; the "
                         f"model's max_sequence_length is {m.max_sequence_length}")
    x = np.full((rows, total), pad_id, dtype=np.int64)
    am = np.zeros_like(x)
    x[:, :width], am[:, :width] = prompt, mask_in
    for r in range(rows):
        x[r, width:layout.end(r)] = mask_id
        am[r, width:layout.end(r)] = 1
    schedule = s.schedule()
    finished = [False] * rows
    final_until = [width] * rows
    cache = None
    if s.cache == "block":
        cache = BlockCache(graph, am, [layout.span(r, 0)[0] for r in range(rows)], b, pad_id)
    for j in range(layout.generations):
        active = [r for r in range(rows) if not finished[r] and layout.running(r, j)]
        if not active:
            break
        spans = {r: layout.span(r, j) for r in active}
        end = max(hi for _, hi in spans.values())
        done = {r: False for r in active}
        post = {r: 0 for r in active}
        for step in range(s.steps_per_block + s.max_post_steps):
            live = [r for r in active if not done[r]]
            if not live:
                break
            start = time.perf_counter()
            if cache is None:
                index = np.stack([np.arange(*spans[r]) for r in live])
                out = graph.run(x[live, :end], am[live, :end], index, block_length=b, logits=s.temperature > 0)
            else:  # every row of the block runs, so the cache keeps its rows until the next block
                out = cache.step(x, active, j, logits=s.temperature > 0).rows([active.index(r) for r in live])
            seconds = time.perf_counter() - start
            x0, p = propose(out, s, noise)
            written = [np.zeros(0, dtype=np.int64)] * rows
            for i, r in enumerate(live):
                lo, hi = spans[r]
                current = x[r, lo:hi]
                masked = current == mask_id
                chosen = np.zeros_like(masked)
                if masked.any():
                    confidence = np.where(masked, p[i], -np.inf)
                    high = confidence > s.threshold
                    n = schedule[min(step, len(schedule) - 1)]
                    if int(high.sum()) >= n:
                        chosen = high
                    else:
                        order = np.argsort(-confidence, kind="stable")
                        chosen[order[:min(n, int(masked.sum()))]] = True
                edits = np.zeros_like(masked)
                if s.editing_threshold is not None:
                    edits = ~masked & (np.arange(lo, hi) >= width) & (x0[i] != current) & (p[i] > s.editing_threshold)
                x[r, lo:hi] = np.where(chosen | edits, x0[i], current)
                written[r] = lo + np.flatnonzero(chosen | edits)
                if not (x[r, lo:hi] == mask_id).any():
                    if not masked.any():
                        post[r] += 1
                    done[r] = (s.editing_threshold is None or post[r] >= s.max_post_steps
                               or (not masked.any() and not edits.any()))
                if s.eos_early_stop and (x0[i][chosen] == eos_id).any():
                    gen = x[r, width:hi]
                    eos = np.flatnonzero(gen == eos_id)
                    if eos.size and (gen[:eos[0]] != mask_id).all():
                        done[r] = finished[r] = True
                if done[r]:
                    final_until[r] = hi
            if callback is not None and callback(BlockStepInfo(j, step, x, written, list(final_until), width,
                                                               seconds)) is False:
                return x
        for r in active:
            if (x[r, width:spans[r][1]] == eos_id).any():
                finished[r] = True
    return x
