"""The official LLaDA sampler in NumPy, driving an exported graph (token-exact with the torch reference).

Per step it asks the graph only for the positions that can be committed (the masked ones of the current block).
On the greedy ``low_confidence`` path the graph's ``top_ids``/``top_prob`` are all it needs; ``logits`` of those
positions are fetched only when a setting needs them (temperature > 0, CFG, EOS/EoT suppression), and float64 is
used only for the Gumbel-max over them, as upstream does.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .errors import InputError
from .kv_cache import KVCacheSession
from .noise import Noise
from .policies import factor_count, threshold_count
from .session import GraphSession
from .settings import SamplerSettings, suppressed_confidence_ids, window_start


@dataclass
class StepInfo:
    """What a ``callback`` sees after every step. Return ``False`` from the callback to stop early."""

    block: int
    step: int  # 0-based, over the whole generation
    total_steps: int | None  # None under threshold/factor decoding, where blocks run until they are filled
    canvas: np.ndarray  # [batch, prompt + gen] int64, the live canvas (copy it to keep it)
    committed: list[np.ndarray]  # per row, the canvas positions committed in this step
    prompt_length: int


Callback = Callable[[StepInfo], Optional[bool]]


def transfer_schedule(masked: np.ndarray, steps: int) -> np.ndarray:
    """``[batch, steps]`` token counts: ``n // steps`` each, the first ``n % steps`` steps one more."""
    base, remainder = np.divmod(masked.astype(np.int64), steps)
    return base[:, None] + (np.arange(steps)[None, :] < remainder[:, None])


def softmax_at(logits: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``softmax(logits, -1)[..., index]`` in float32, without materialising the whole softmax twice."""
    top = logits.max(axis=-1, keepdims=True)
    exp = np.exp(logits - top)
    picked = np.take_along_axis(exp, index[..., None], axis=-1)[..., 0]
    return (picked / exp.sum(axis=-1)).astype(np.float32)


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

    With ``settings.cache`` other than "none", steps run on ``cache_graph``: a refresh at each block's first step
    (and every ``refresh_every`` steps), cached steps in between.
    """
    if settings.cache != "none" and cache_graph is None:
        raise InputError(f"`cache` {settings.cache} needs the export's KV-cache graph (export with --cache)")
    m = graph.manifest
    mask_id, eos_id, eot_id = m.id("mask_token_id"), m.id("eos_token_id"), m.id("eot_token_id")
    prompt = np.asarray(prompt, dtype=np.int64)
    settings.check_request(prompt, attention_mask, mask_id=mask_id, pad_id=m.id("pad_token_id"),
                           max_length=m.max_sequence_length)
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
    suppressed = list(suppressed_confidence_ids(s, eos_id=eos_id, eot_id=eot_id))
    need_logits = s.temperature > 0 or cfg or s.logits_eos_inf or bool(suppressed)
    rows = np.arange(batch)

    step = 0
    for block in range(s.num_blocks):
        block_start = prompt_len + block * s.block_length
        block_end = block_start + s.block_length
        schedule = transfer_schedule((x[:, block_start:block_end] == mask_id).sum(axis=1), s.steps_per_block)
        for i in itertools.count():
            if (not s.parallel and i == s.steps_per_block) or (s.parallel and not (x[:, :block_end] == mask_id).any()):
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
            if s.cache == "none":
                out = graph.run(feed, am, fed_positions, logits=need_logits)
            elif i == 0 or (s.refresh_every and i % s.refresh_every == 0):
                out, kv = cache_graph.refresh(feed, am, fed_positions, logits=need_logits)
            else:
                fed_end = block_end if s.cache == "dual" else feed.shape[1]
                out = cache_graph.step(feed, am, lo, fed_end, fed_positions, kv, logits=need_logits)

            if need_logits:
                logits = out.logits
                if cfg:
                    cond, uncond = logits[:batch], logits[batch:]
                    logits = uncond + (s.cfg_scale + 1) * (cond - uncond)
                if s.logits_eos_inf:
                    logits[..., eos_id] = -np.inf
                if s.temperature > 0:
                    u = noise.gumbel_uniforms((batch, window.shape[1], logits.shape[-1]))  # drawn for the window
                    u = np.take_along_axis(u, order[..., None], axis=1)
                    x0 = np.argmax(np.exp(logits.astype(np.float64)) / (-np.log(u)) ** s.temperature, axis=-1)
                else:
                    x0 = np.argmax(logits, axis=-1)
                if s.remasking == "low_confidence":
                    if suppressed:
                        logits[..., suppressed] = -np.inf
                    confidence = softmax_at(logits, x0)
            else:
                x0, confidence = out.top_ids, out.top_prob
            if s.remasking == "random":
                confidence = np.take_along_axis(noise.remask_uniforms(window.shape), order, axis=1)

            confidence = np.where(masked, confidence, -np.inf)
            committed = []
            for j in rows:
                ranked = np.argsort(-confidence[j], kind="stable")
                k = commit_count(confidence[j, ranked[:masked[j].sum()]], s) if s.parallel else int(schedule[j, i])
                chosen = ranked[:k]
                x[j, positions[j, chosen]] = x0[j, chosen]
                committed.append(positions[j, chosen])
            if callback is not None:
                info = StepInfo(block, step, None if s.parallel else s.steps, x, committed, prompt_len)
                if callback(info) is False:
                    return x
            step += 1
        if s.early_stop and np.isin(x[:, prompt_len:block_end], (eos_id, eot_id)).any(axis=1).all():
            x[:, block_end:] = m.id("pad_token_id")  # every row's text ends in a finished block: it is final
            return x
    return x


def commit_count(sorted_confidence: np.ndarray, settings: SamplerSettings) -> int:
    """Tokens to commit in a row under the parallel rule of ``settings`` (confidences in descending order)."""
    if settings.threshold is not None:
        return threshold_count(sorted_confidence, settings.threshold)
    return factor_count(sorted_confidence, settings.factor)
