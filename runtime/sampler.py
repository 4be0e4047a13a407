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

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .errors import InputError
from .kv_cache import KVCacheSession
from .model_calls import CachedForward, FullForward, ModelCall
from .noise import Noise
from .policies import CommitRule, commit_rule
from .proposal import LLaDAProposal, Proposal
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
    if settings.cache != "none" and cache_graph is None:
        raise InputError(f"`cache` {settings.cache} needs the export's KV-cache graph (export with --cache)")
    m = graph.manifest
    mask_id = m.id("mask_token_id")
    prompt = np.asarray(prompt, dtype=np.int64)
    settings.check_request(prompt, attention_mask, mask_id=mask_id, pad_id=m.id("pad_token_id"),
                           max_length=m.max_sequence_length)
    call: ModelCall = (FullForward(graph) if settings.cache == "none"
                       else CachedForward(cache_graph, settings.cache, settings.refresh_every))
    proposal = LLaDAProposal(settings, noise, batch=prompt.shape[0], eos_id=m.id("eos_token_id"),
                             eot_id=m.id("eot_token_id"))
    return run_sampler(call, proposal, commit_rule(settings), prompt, attention_mask, settings, mask_id=mask_id,
                       stop_ids=(m.id("eos_token_id"), m.id("eot_token_id")), pad_id=m.id("pad_token_id"),
                       callback=callback)


def run_sampler(call: ModelCall, proposal: Proposal, rule: CommitRule, prompt: np.ndarray,
                attention_mask: np.ndarray | None, settings: SamplerSettings, *, mask_id: int,
                stop_ids: tuple[int, int], pad_id: int, callback: Callback | None = None) -> np.ndarray:
    """The block-and-step loop over the three phases (see the module docstring)."""
    s = settings
    batch, prompt_len = prompt.shape
    x = np.full((batch, prompt_len + s.gen_length), mask_id, dtype=np.int64)
    x[:, :prompt_len] = prompt
    am = np.ones_like(x)
    if attention_mask is not None:
        am[:, :prompt_len] = np.asarray(attention_mask, dtype=np.int64)
    prompt_index = x != mask_id
    cfg = s.cfg_scale > 0
    if cfg:
        am = np.concatenate([am, am])

    step = 0
    for block in range(s.num_blocks):
        block_start = prompt_len + block * s.block_length
        block_end = block_start + s.block_length
        rule.start_block((x[:, block_start:block_end] == mask_id).sum(axis=1))
        for i in itertools.count():
            if rule.block_done(i, bool((x[:, :block_end] == mask_id).any())):
                break
            lo = window_start(x, mask_id, block_start)
            # Only the window's masked positions can be committed: the graph predicts those alone (in canvas order,
            # rows padded to the batch's largest count), which keeps the vocabulary-sized head off the rest.
            window = x[:, lo:block_end] == mask_id
            order = np.argsort(~window, axis=1, kind="stable")[:, :max(1, int(window.sum(axis=1).max()))]
            masked = np.take_along_axis(window, order, axis=1)  # False on padding
            positions = lo + order
            feed = np.concatenate([x, np.where(prompt_index, mask_id, x)]) if cfg else x
            fed_positions = np.concatenate([positions, positions]) if cfg else positions
            out = call(feed, am, fed_positions, step=i, window_start=lo, block_end=block_end,
                       logits=proposal.needs_logits)
            x0, confidence = proposal(out, order, window.shape[1])

            confidence = np.where(masked, confidence, -np.inf)
            committed = []
            for j in range(batch):
                ranked = np.argsort(-confidence[j], kind="stable")
                chosen = ranked[:rule.count(j, i, confidence[j, ranked[:masked[j].sum()]])]
                x[j, positions[j, chosen]] = x0[j, chosen]
                committed.append(positions[j, chosen])
            if callback is not None:
                info = StepInfo(block, step, rule.total_steps, x, committed, prompt_len, call.seconds)
                if callback(info) is False:
                    return x
            step += 1
        if s.early_stop and np.isin(x[:, prompt_len:block_end], stop_ids).any(axis=1).all():
            x[:, block_end:] = pad_id  # every row's text ends in a finished block: it is final
            return x
    return x
