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
from .sampler import CallRequest
from .contract import StepOutput
from .session import GraphSession


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
    run = BlockRun(graph, prompt, attention_mask, settings, noise)
    while (request := run.next_call()) is not None:
        info = run.take(run.call(*request.inputs, **request.options), run.call.seconds)
        if callback is not None and callback(info) is False:
            break
    return run.canvas


class BlockForward:
    """The model call of one run: the current block against its cache (:class:`BlockCache`), or with
    ``cache="none"`` the whole canvas up to the current blocks' end. ``seconds``: the last call's time."""

    def __init__(self, graph: GraphSession, cache: BlockCache | None, attention_mask: np.ndarray, block_length: int):
        self.graph, self.cache, self.attention_mask, self.block_length = graph, cache, attention_mask, block_length
        self.seconds = 0.0

    def __call__(self, canvas: np.ndarray, active: list[int], live: list[int], block: int,
                 spans: dict[int, tuple[int, int]], *, logits: bool) -> StepOutput:
        start = time.perf_counter()
        if self.cache is None:
            end = max(hi for _, hi in spans.values())
            index = np.stack([np.arange(*spans[r]) for r in live])
            out = self.graph.run(canvas[live, :end], self.attention_mask[live, :end], index,
                                 block_length=self.block_length, logits=logits)
        else:  # every row of the block runs, so the cache keeps its rows until the next block
            out = self.cache.step(canvas, active, block, logits=logits).rows([active.index(r) for r in live])
        self.seconds = time.perf_counter() - start
        return out


class BlockRun:
    """One block-diffusion generation as a state machine, as :class:`~.sampler.SamplerRun` is for LLaDA's sampler:
    :meth:`next_call` says what the next step needs (``None``: the generation is over), ``call`` (the run's own
    :class:`BlockForward`: its cache is the run's) answers it, and :meth:`take` applies the answer.
    :func:`generate_block_ids` drives one run; the server's scheduler interleaves many."""

    def __init__(self, graph: GraphSession, prompt: np.ndarray, attention_mask: np.ndarray | None,
                 settings: BlockSettings, noise: Noise):
        m = graph.manifest
        self.mask_id, self.eos_id, pad_id = m.id("mask_token_id"), m.id("eos_token_id"), m.id("pad_token_id")
        self.s, self.noise, b = settings, noise, settings.block_length
        prompt = np.asarray(prompt, dtype=np.int64)
        rows, self.width = prompt.shape
        mask_in = np.ones_like(prompt) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        self.layout = layout = settings.layout(mask_in.sum(axis=1).tolist(), self.width)
        if layout.total > m.max_sequence_length:
            raise InputError(f"prompt + `gen_length` {settings.gen_length}, in blocks of {b}, needs {layout.total} "
                             f"positions; the model's max_sequence_length is {m.max_sequence_length}")
        x = np.full((rows, layout.total), pad_id, dtype=np.int64)
        am = np.zeros_like(x)
        x[:, :self.width], am[:, :self.width] = prompt, mask_in
        for r in range(rows):
            x[r, self.width:layout.end(r)] = self.mask_id
            am[r, self.width:layout.end(r)] = 1
        self.canvas, self.schedule = x, settings.schedule()
        self.finished = [False] * rows
        self.final_until = [self.width] * rows
        cache = None
        if settings.cache == "block":
            cache = BlockCache(graph, am, [layout.span(r, 0)[0] for r in range(rows)], b, pad_id)
        self.call = BlockForward(graph, cache, am, b)
        self.block, self.active, self.over = 0, None, False  # the block being generated, its rows
        self.spans, self.done, self.post, self.live, self.step = {}, {}, {}, [], 0  # per row of the block; its step

    def next_call(self) -> CallRequest | None:
        s, rows = self.s, range(self.canvas.shape[0])
        while not self.over:
            if self.active is None:  # the next block
                self.active = [r for r in rows if not self.finished[r] and self.layout.running(r, self.block)]
                if self.block >= self.layout.generations or not self.active:
                    self.over = True
                    break
                self.spans = {r: self.layout.span(r, self.block) for r in self.active}
                self.done = {r: False for r in self.active}
                self.post = {r: 0 for r in self.active}
                self.step = 0
            self.live = [r for r in self.active if not self.done[r]]
            if self.live and self.step < s.steps_per_block + s.max_post_steps:
                return CallRequest((self.canvas, self.active, self.live, self.block, self.spans),
                                   dict(logits=s.temperature > 0))
            for r in self.active:
                if (self.canvas[r, self.width:self.spans[r][1]] == self.eos_id).any():
                    self.finished[r] = True
            self.block, self.active = self.block + 1, None
        return None

    def take(self, out: StepOutput, model_seconds: float) -> BlockStepInfo:
        """Commit (and edit) the step's tokens from the model's answer to the last :meth:`next_call`."""
        s, x, width, mask_id = self.s, self.canvas, self.width, self.mask_id
        x0, p = propose(out, s, self.noise)
        written = [np.zeros(0, dtype=np.int64)] * x.shape[0]
        for i, r in enumerate(self.live):
            lo, hi = self.spans[r]
            current = x[r, lo:hi]
            masked = current == mask_id
            chosen = np.zeros_like(masked)
            if masked.any():
                confidence = np.where(masked, p[i], -np.inf)
                high = confidence > s.threshold
                n = self.schedule[min(self.step, len(self.schedule) - 1)]
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
                    self.post[r] += 1
                self.done[r] = (s.editing_threshold is None or self.post[r] >= s.max_post_steps
                                or (not masked.any() and not edits.any()))
            if s.eos_early_stop and (x0[i][chosen] == self.eos_id).any():
                gen = x[r, width:hi]
                eos = np.flatnonzero(gen == self.eos_id)
                if eos.size and (gen[:eos[0]] != mask_id).all():
                    self.done[r] = self.finished[r] = True
            if self.done[r]:
                self.final_until[r] = hi
        info = BlockStepInfo(self.block, self.step, x, written, list(self.final_until), width, model_seconds)
        self.step += 1
        return info
