"""The sampler's third phase: the commit rule, how many of a row's proposed tokens one step commits.

Every rule commits a prefix of the masked positions ranked by confidence, ``c_1 >= c_2 >= ...`` (the most
confident ones), and decides when a block is finished:

- :class:`Scheduled` (the official sampler): the block's masked tokens split over its steps, ``n // steps`` each
  and the first ``n % steps`` steps one more; the block ends after ``steps_per_block`` steps.
- Fast-dLLM's parallel rules, which always commit at least one token (so every step makes progress) and run a
  block until it has no mask left: :class:`Threshold` tau commits every position with ``c_i >= tau``;
  :class:`Factor` f commits the largest ``n`` with ``(n + 1) * (1 - c_n) < f`` (as ``(n + 1) * (1 - c_n)`` grows
  with ``n``, that is the count of positions satisfying it).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .settings import SamplerSettings


class CommitRule(Protocol):
    total_steps: int | None  # over the whole generation, when the rule knows it in advance

    def start_block(self, masked: np.ndarray) -> None:
        """A block begins; ``masked`` ``[B]`` counts its masked positions per row."""

    def block_done(self, step: int, masks_left: bool) -> bool:
        """Whether the block is finished before its step ``step`` (``masks_left``: any mask up to its end)."""

    def count(self, row: int, step: int, sorted_confidence: np.ndarray) -> int:
        """Tokens row ``row`` commits at block step ``step``; ``sorted_confidence``: its masked positions'
        confidences, descending."""


class Scheduled:
    def __init__(self, settings: SamplerSettings):
        self.steps, self.total_steps = settings.steps_per_block, settings.steps
        self.schedule = np.zeros((0, self.steps), dtype=np.int64)

    def start_block(self, masked: np.ndarray) -> None:
        self.schedule = transfer_schedule(masked, self.steps)

    def block_done(self, step: int, masks_left: bool) -> bool:
        return step == self.steps

    def count(self, row: int, step: int, sorted_confidence: np.ndarray) -> int:
        return int(self.schedule[row, step])


class _UntilFilled:
    """The parallel rules' block end: when no mask is left; the step count is not known in advance."""

    total_steps = None

    def start_block(self, masked: np.ndarray) -> None:
        pass

    def block_done(self, step: int, masks_left: bool) -> bool:
        return not masks_left


class Threshold(_UntilFilled):
    def __init__(self, tau: float):
        self.tau = tau

    def count(self, row: int, step: int, sorted_confidence: np.ndarray) -> int:
        return threshold_count(sorted_confidence, self.tau)


class Factor(_UntilFilled):
    def __init__(self, f: float):
        self.f = f

    def count(self, row: int, step: int, sorted_confidence: np.ndarray) -> int:
        return factor_count(sorted_confidence, self.f)


def commit_rule(settings: SamplerSettings) -> CommitRule:
    if settings.threshold is not None:
        return Threshold(settings.threshold)
    if settings.factor is not None:
        return Factor(settings.factor)
    return Scheduled(settings)


def transfer_schedule(masked: np.ndarray, steps: int) -> np.ndarray:
    """``[batch, steps]`` token counts: ``n // steps`` each, the first ``n % steps`` steps one more."""
    base, remainder = np.divmod(masked.astype(np.int64), steps)
    return base[:, None] + (np.arange(steps)[None, :] < remainder[:, None])


def threshold_count(sorted_confidence: np.ndarray, tau: float) -> int:
    """Commit count for descending confidences of the still-masked positions (empty: nothing to commit)."""
    if sorted_confidence.size == 0:
        return 0
    return max(1, int(np.count_nonzero(sorted_confidence >= tau)))


def factor_count(sorted_confidence: np.ndarray, f: float) -> int:
    if sorted_confidence.size == 0:
        return 0
    n = np.arange(1, sorted_confidence.size + 1)
    return max(1, int(np.count_nonzero((n + 1) * (1.0 - sorted_confidence.astype(np.float64)) < f)))
