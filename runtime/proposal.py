"""The sampler's second phase: from a step's model outputs to a proposed token and a confidence per position.

On the greedy ``low_confidence`` path the graph's ``top_ids``/``top_prob`` are the proposal. Otherwise the
window's logits are fetched and the official sampler's arithmetic runs on them: classifier-free guidance,
``logits_eos_inf``, Gumbel-max sampling in float64 (temperature > 0), the EOS/EoT confidence options, and random
remasking's uniform confidences. Noise is drawn in the documented order (:mod:`.noise`) over the window, then
reordered like the predicted positions, so the torch reference fed the same numbers proposes the same tokens.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .noise import Noise
from .contract import StepOutput
from .settings import SamplerSettings, suppressed_confidence_ids


class Proposal(Protocol):
    needs_logits: bool  # whether the model call must return the logits of the predicted positions

    def __call__(self, out: StepOutput, order: np.ndarray, window_width: int) -> tuple[np.ndarray, np.ndarray]:
        """``(x0, confidence)`` ``[B, c]`` for the predicted positions, which are the window's columns ``order``
        ``[B, c]`` (the window is ``window_width`` wide)."""


class LLaDAProposal:
    """The official ``generate()``'s proposal; ``batch`` rows (the model call has twice as many under CFG)."""

    def __init__(self, settings: SamplerSettings, noise: Noise, *, batch: int, eos_id: int, eot_id: int):
        self.s, self.noise, self.batch, self.eos_id = settings, noise, batch, eos_id
        self.suppressed = list(suppressed_confidence_ids(settings, eos_id=eos_id, eot_id=eot_id))
        self.needs_logits = (settings.temperature > 0 or settings.cfg_scale > 0 or settings.logits_eos_inf
                             or bool(self.suppressed))

    def __call__(self, out: StepOutput, order: np.ndarray, window_width: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.s
        if self.needs_logits:
            logits = out.logits
            if s.cfg_scale > 0:
                cond, uncond = logits[:self.batch], logits[self.batch:]
                logits = uncond + (s.cfg_scale + 1) * (cond - uncond)
            if s.logits_eos_inf:
                logits[..., self.eos_id] = -np.inf
            if s.temperature > 0:
                u = self.noise.gumbel_uniforms((self.batch, window_width, logits.shape[-1]))  # drawn for the window
                u = np.take_along_axis(u, order[..., None], axis=1)
                x0 = np.argmax(np.exp(logits.astype(np.float64)) / (-np.log(u)) ** s.temperature, axis=-1)
            else:
                x0 = np.argmax(logits, axis=-1)
            confidence = None
            if s.remasking == "low_confidence":
                if self.suppressed:
                    logits[..., self.suppressed] = -np.inf
                confidence = softmax_at(logits, x0)
        else:
            x0, confidence = out.top_ids, out.top_prob
        if s.remasking == "random":
            confidence = np.take_along_axis(self.noise.remask_uniforms((self.batch, window_width)), order, axis=1)
        return x0, confidence


def softmax_at(logits: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``softmax(logits, -1)[..., index]`` in float32, without materialising the whole softmax twice."""
    top = logits.max(axis=-1, keepdims=True)
    exp = np.exp(logits - top)
    picked = np.take_along_axis(exp, index[..., None], axis=-1)[..., 0]
    return (picked / exp.sum(axis=-1)).astype(np.float32)
