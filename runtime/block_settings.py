"""The block-diffusion sampler's settings (LLaDA2): the official LLaDA2.0 ``generate()``'s arguments, names and
defaults (but ``gen_length`` 128, the project's length everywhere; the official default is 2048), and LLaDA2.1's
token editing (off by default), and ``cache``: by default each step runs the current block against the cached
keys/values of the finished ones (:mod:`.block_cache`, exact); ``"none"`` runs the whole prefix every step, as
the official code does. Declared once: the NumPy sampler (:mod:`.block_sampler`)
and the torch reference (``llada_onnx.models.block_sampler``) both take them.

``steps`` is per block and is first capped at ``gen_length // minimal_topk``; ``threshold`` commits every masked
position of the block whose probability exceeds it, or, when fewer pass than the schedule's count for the step
(``block_length`` split over the steps), that many by probability. A bad setting raises
:class:`~.errors.InputError` naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import InputError


CACHE_MODES = ("block", "none")


@dataclasses.dataclass(frozen=True)
class BlockSettings:
    gen_length: int = 128
    block_length: int = 32
    steps: int = 32  # per block
    threshold: float = 0.95
    minimal_topk: int = 1
    eos_early_stop: bool = False
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    editing_threshold: float | None = None  # LLaDA2.1: replace committed tokens predicted otherwise above this
    max_post_steps: int = 0  # LLaDA2.1: editing steps after a block's last mask is filled
    cache: str = "block"  # "block": finished blocks' keys/values cached (exact); "none": the official full prefix

    def __post_init__(self) -> None:
        for name in ("gen_length", "block_length", "steps", "minimal_topk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"`{name}` must be a positive integer, got {value!r}")
        if not 0 < self.threshold <= 1:
            raise InputError(f"`threshold` must be in (0, 1], got {self.threshold}")
        if self.temperature < 0:
            raise InputError(f"`temperature` must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"`top_k` must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"`top_p` must be in (0, 1], got {self.top_p}")
        if self.editing_threshold is not None and not 0 < self.editing_threshold <= 1:
            raise InputError(f"`editing_threshold` must be in (0, 1], got {self.editing_threshold}")
        if self.cache not in CACHE_MODES:
            raise InputError(f"unknown `cache` {self.cache!r} for block diffusion; use one of {', '.join(CACHE_MODES)}")
        if self.max_post_steps < 0 or (self.max_post_steps and self.editing_threshold is None):
            raise InputError("`max_post_steps` needs `editing_threshold` (post steps only edit)")

    @classmethod
    def of(cls, settings: dict[str, Any]) -> "BlockSettings":
        """Settings from keyword arguments, refusing unknown names; ``None`` leaves a setting at its default."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise InputError(f"unknown block-diffusion setting(s) {', '.join(unknown)}; the settings are "
                             f"{', '.join(names)}")
        return cls(**{k: v for k, v in settings.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def steps_per_block(self) -> int:
        return max(1, min(self.steps, self.gen_length // self.minimal_topk))

    def schedule(self) -> list[int]:
        """Tokens to commit at each step of a block: ``block_length`` over the steps, the first ones one more."""
        n, s = self.block_length, self.steps_per_block
        return [n // s + (i < n % s) for i in range(s)]

    def layout(self, lengths: list[int], width: int) -> "BlockLayout":
        """The canvas of a batch of prompts with ``lengths`` real tokens, left-padded to ``width``."""
        b = self.block_length
        pads = [width - n for n in lengths]
        first = [n // b for n in lengths]  # the block holding each row's prompt end is its first generated one
        blocks = [(n + self.gen_length + b - 1) // b for n in lengths]
        return BlockLayout(b, width, pads, first, blocks, max(p + n * b for p, n in zip(pads, blocks)))


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Where each row's blocks lie on the canvas: row ``r`` has ``pads[r]`` pads, then its own block grid (counted
    from its first token) up to ``blocks[r]`` blocks, of which it generates ``first[r]`` onwards."""

    block_length: int
    width: int
    pads: list[int]
    first: list[int]
    blocks: list[int]
    total: int  # canvas length: the longest row's last block end

    @property
    def generations(self) -> int:
        """How many blocks the longest-running row generates."""
        return max(nb - f for nb, f in zip(self.blocks, self.first))

    def span(self, row: int, j: int) -> tuple[int, int]:
        """Canvas positions of row ``row``'s ``j``-th generated block."""
        lo = self.pads[row] + (self.first[row] + j) * self.block_length
        return lo, lo + self.block_length

    def end(self, row: int) -> int:
        """Where row ``row``'s canvas ends (its last block's end)."""
        return self.pads[row] + self.blocks[row] * self.block_length

    def running(self, row: int, j: int) -> bool:
        return self.first[row] + j < self.blocks[row]

