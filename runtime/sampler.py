"""The official LLaDA sampler in NumPy, driving exported graphs (token-exact with the torch reference).

Each step runs three phases, each its own module with its own tests:

1. the *model call* (:mod:`.model_calls`): predictions for the positions the step can commit, from a full
   forward or a KV-cached one;
2. the *proposal* (:mod:`.proposal`): a token and a confidence per predicted position;
3. the *commit rule* (:mod:`.policies`): how many of each row's most confident proposals become final.

Per step the graphs are asked only for the masked positions of the current window, so the vocabulary-sized head
never runs on committed tokens, and on the greedy path no vocabulary-sized tensor reaches the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .errors import InputError
from .kv_cache import KVCacheSession
from .model_calls import CachedForward, FullForward, ModelCall
from .noise import Noise
from .manifest import Manifest
from .policies import CommitRule, commit_rule
from .proposal import LLaDAProposal, Proposal
from .contract import StepOutput
from .session import GraphSession
from .settings import SamplerSettings, window_start


@dataclass
class StepInfo:
    """What a ``callback`` sees after every step. Return ``False`` from the callback to stop early."""

    block: int
    step: int  # 0-based, over the whole generation
    total_steps: int | None  # None under threshold/factor decoding, where blocks run until they are filled
    canvas: np.ndarray  # [batch, prompt + gen] int64, the live canvas (copy it to keep it)
    committed: list[np.ndarray]  # per row, the canvas positions committed in this step
    prompt_length: int
    model_seconds: float  # the step's time inside onnxruntime (the rest of the step is the sampler's own)


Callback = Callable[[StepInfo], Optional[bool]]


def generate_ids(
    graph: GraphSession,
    prompt: np.ndarray,
    attention_mask: np.ndarray | None,
    settings: SamplerSettings,
    *,
    noise: Noise,
    callback: Callback | None = None,
    cache_graph: KVCacheSession | None = None,
) -> np.ndarray:
    """Run the sampler; returns the canvas ``[batch, prompt_len + gen_length]`` (int64).

    With ``settings.cache`` other than "none", steps run on ``cache_graph`` (see :class:`CachedForward`).
    """
    run = new_run(graph.manifest, prompt, attention_mask, settings, noise)
    call = model_call(graph, settings, cache_graph)
    while (request := run.next_call()) is not None:
        info = run.take(call(*request.inputs, **request.options), call.seconds)
        if callback is not None and callback(info) is False:
            break
    return run.canvas


def new_run(manifest: Manifest, prompt: np.ndarray, attention_mask: np.ndarray | None, settings: SamplerSettings,
            noise: Noise) -> "SamplerRun":
    """A checked request turned into its :class:`SamplerRun` (the official proposal and the settings' commit rule)."""
    mask_id = manifest.id("mask_token_id")
    prompt = np.asarray(prompt, dtype=np.int64)
    settings.check_request(prompt, attention_mask, mask_id=mask_id, pad_id=manifest.id("pad_token_id"),
                           max_length=manifest.max_sequence_length)
    stop_ids = (manifest.id("eos_token_id"), manifest.id("eot_token_id"))
    proposal = LLaDAProposal(settings, noise, batch=prompt.shape[0], eos_id=stop_ids[0], eot_id=stop_ids[1])
    return SamplerRun(proposal, commit_rule(settings), prompt, attention_mask, settings, mask_id=mask_id,
                      stop_ids=stop_ids, pad_id=manifest.id("pad_token_id"))


def model_call(graph: GraphSession, settings: SamplerSettings, cache_graph: KVCacheSession | None) -> ModelCall:
    if settings.cache == "none":
        return FullForward(graph)
    if cache_graph is None:
        raise InputError(f"`cache` {settings.cache} needs the export's KV-cache graph (export with --cache)")
    return CachedForward(cache_graph, settings.cache, settings.refresh_every)


@dataclass
class CallRequest:
    """What one step asks of the model call: ``call(*inputs, **options)``."""

    inputs: tuple  # LLaDA: canvas [rows, L], attention mask [rows, L], positions; block diffusion: BlockForward's
    options: dict  # step (within the block), window_start, block_end, logits


class SamplerRun:
    """One generation as a state machine: :meth:`next_call` says what the next step needs from the model (or
    ``None`` when the generation is over), :meth:`take` applies the model's answer. :func:`generate_ids` drives
    one run; the server's scheduler drives many, answering several runs' requests with one model call."""

    def __init__(self, proposal: Proposal, rule: CommitRule, prompt: np.ndarray, attention_mask: np.ndarray | None,
                 settings: SamplerSettings, *, mask_id: int, stop_ids: tuple[int, int], pad_id: int):
        self.s, self.proposal, self.rule = settings, proposal, rule
        self.mask_id, self.stop_ids, self.pad_id = mask_id, stop_ids, pad_id
        batch, self.prompt_len = prompt.shape
        x = np.full((batch, self.prompt_len + settings.gen_length), mask_id, dtype=np.int64)
        x[:, :self.prompt_len] = prompt
        am = np.ones_like(x)
        if attention_mask is not None:
            am[:, :self.prompt_len] = np.asarray(attention_mask, dtype=np.int64)
        self.canvas, self.prompt_index = x, x != mask_id
        self.cfg = settings.cfg_scale > 0
        self.attention_mask = np.concatenate([am, am]) if self.cfg else am
        self.block, self.i, self.step, self.done = 0, 0, 0, False
        self._block_open = False
        self._pending = None

    @property
    def block_end(self) -> int:
        return self.prompt_len + (self.block + 1) * self.s.block_length

    def next_call(self) -> CallRequest | None:
        x, s = self.canvas, self.s
        while not self.done:
            block_start, block_end = self.block_end - s.block_length, self.block_end
            if not self._block_open:
                self.rule.start_block((x[:, block_start:block_end] == self.mask_id).sum(axis=1))
                self._block_open, self.i = True, 0
            if self.rule.block_done(self.i, bool((x[:, :block_end] == self.mask_id).any())):
                self._end_block()
                continue
            lo = window_start(x, self.mask_id, block_start)
            # Only the window's masked positions can be committed: the graph predicts those alone (in canvas order,
            # rows padded to the batch's largest count), which keeps the vocabulary-sized head off the rest.
            window = x[:, lo:block_end] == self.mask_id
            order = np.argsort(~window, axis=1, kind="stable")[:, :max(1, int(window.sum(axis=1).max()))]
            masked = np.take_along_axis(window, order, axis=1)  # False on padding
            positions = lo + order
            self._pending = (order, masked, positions, window.shape[1])
            feed = np.concatenate([x, np.where(self.prompt_index, self.mask_id, x)]) if self.cfg else x
            fed_positions = np.concatenate([positions, positions]) if self.cfg else positions
            return CallRequest((feed, self.attention_mask, fed_positions),
                               dict(step=self.i, window_start=lo, block_end=block_end,
                                    logits=self.proposal.needs_logits))
        return None

    def _end_block(self) -> None:
        x, s, block_end = self.canvas, self.s, self.block_end
        self._block_open = False
        if s.early_stop and np.isin(x[:, self.prompt_len:block_end], self.stop_ids).any(axis=1).all():
            x[:, block_end:] = self.pad_id  # every row's text ends in a finished block: it is final
            self.done = True
        self.block += 1
        self.done |= self.block == s.num_blocks

    def take(self, out: StepOutput, model_seconds: float) -> StepInfo:
        """Commit the step's tokens from the model's answer to the last :meth:`next_call`."""
        order, masked, positions, width = self._pending
        x0, confidence = self.proposal(out, order, width)
        confidence = np.where(masked, confidence, -np.inf)
        committed = []
        for j in range(self.canvas.shape[0]):
            ranked = np.argsort(-confidence[j], kind="stable")
            chosen = ranked[:self.rule.count(j, self.i, confidence[j, ranked[:masked[j].sum()]])]
            self.canvas[j, positions[j, chosen]] = x0[j, chosen]
            committed.append(positions[j, chosen])
        info = StepInfo(self.block, self.step, self.rule.total_steps, self.canvas, committed, self.prompt_len,
                        model_seconds)
        self.i += 1
        self.step += 1
        return info
