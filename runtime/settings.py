"""Sampler settings and their validation, shared by the torch reference sampler and the NumPy runtime.

Both samplers accept the same keyword arguments as the official ``generate()``; putting the checks here means a
bad setting gets the same actionable ``ValueError`` from either engine, instead of upstream's bare asserts.
"""

from __future__ import annotations

import dataclasses

import numpy as np

REMASKING = ("low_confidence", "random")
CACHE_MODES = ("none", "prefix", "dual")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """The official sampler's knobs.

    ``steps`` is the total over all blocks. ``confidence_eos_eot_inf`` reproduces upstream exactly, bug included
    (see :func:`suppressed_confidence_ids`); ``confidence_eos_eot_inf_fixed`` is what upstream intended: EOS
    and EoT both get confidence 0 at every temperature. ``allow_mask_in_prompt`` lets mask ids in the prompt be
    filled in (infilling) as upstream would; by default they are refused as a likely mistake.

    Fast decoding (runtime only, see :mod:`.policies`): ``threshold`` or ``factor`` replace the fixed per-step
    count by a confidence rule, and each block then runs until it has no mask left (``steps`` is not used).
    ``early_stop`` ends the generation once every row has an EOS/EoT in a completed block and fills the rest
    with the pad id: the text up to the first stop token is then final, so decoded text is unchanged.
    ``cache`` ("prefix" or "dual") runs the steps of a block against keys/values cached by a full forward at the
    block's first step, and again every ``refresh_every`` steps if set (see :mod:`.kv_cache`): approximate.
    """

    steps: int = 128
    gen_length: int = 128
    block_length: int = 128
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    confidence_eos_eot_inf_fixed: bool = False
    allow_mask_in_prompt: bool = False
    threshold: float | None = None
    factor: float | None = None
    early_stop: bool = False
    cache: str = "none"
    refresh_every: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "gen_length", "block_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length ({self.gen_length}) must be a multiple of block_length ({self.block_length}); "
                f"e.g. block_length={_divisor_hint(self.gen_length, self.block_length)}")
        if self.steps % self.num_blocks:
            raise ValueError(
                f"steps ({self.steps}) is the total over {self.num_blocks} blocks and must be a multiple of it; "
                f"e.g. steps={max(1, self.steps // self.num_blocks) * self.num_blocks}")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not np.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0 (0 = no classifier-free guidance), got {self.cfg_scale}")
        if self.remasking not in REMASKING:
            raise ValueError(f"unknown remasking {self.remasking!r}; use one of {', '.join(REMASKING)}")
        if self.threshold is not None and self.factor is not None:
            raise ValueError("set either threshold or factor (two parallel-decoding rules), not both")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1] (a confidence; Fast-dLLM uses 0.9), got {self.threshold}")
        if self.factor is not None and not (np.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"factor must be > 0 (Fast-dLLM uses 1.0), got {self.factor}")
        if self.parallel and self.remasking != "low_confidence":
            raise ValueError("threshold and factor decoding rank by confidence: use remasking='low_confidence'")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"unknown cache {self.cache!r}; use one of {', '.join(CACHE_MODES)}")
        if self.refresh_every is not None:
            if isinstance(self.refresh_every, bool) or not isinstance(self.refresh_every, (int, np.integer)) \
                    or self.refresh_every < 1:
                raise ValueError(f"refresh_every must be a positive integer (steps), got {self.refresh_every!r}")
            if self.cache == "none":
                raise ValueError("refresh_every needs cache='prefix' or 'dual'")
        if self.confidence_eos_eot_inf and self.confidence_eos_eot_inf_fixed:
            raise ValueError("set either confidence_eos_eot_inf (upstream's shipped behaviour) or "
                             "confidence_eos_eot_inf_fixed (the intended one), not both")

    @property
    def parallel(self) -> bool:
        """Whether a confidence rule (threshold or factor) decides how many tokens each step commits."""
        return self.threshold is not None or self.factor is not None

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    def check_request(self, prompt: np.ndarray, attention_mask: np.ndarray | None, *, mask_id: int,
                      pad_id: int, max_length: int) -> None:
        """Validate a prompt batch ``[B, Lp]`` against these settings and the model's ids and length."""
        if prompt.ndim != 2 or prompt.shape[0] < 1:
            raise ValueError(f"prompt must be a [batch, length] array with batch >= 1, got shape {prompt.shape}")
        if attention_mask is not None and attention_mask.shape != prompt.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} differs from prompt shape {prompt.shape}")
        total = prompt.shape[1] + self.gen_length
        if total > max_length:
            raise ValueError(
                f"prompt length {prompt.shape[1]} + gen_length {self.gen_length} = {total} exceeds the model's "
                f"max_sequence_length {max_length}; shorten the prompt or lower gen_length")
        if pad_id == mask_id:
            raise ValueError(f"the pad id equals the mask id ({mask_id}): padding would be generated over; "
                             "pad with the EOS/pad id instead")
        if not self.allow_mask_in_prompt and bool((prompt == mask_id).any()):
            rows = sorted({int(r) for r in np.nonzero(prompt == mask_id)[0]})
            raise ValueError(
                f"the prompt contains the mask id {mask_id} (rows {rows[:5]}); it would be generated over. "
                "Remove it, or pass allow_mask_in_prompt=True to infill those positions")


def suppressed_confidence_ids(settings: SamplerSettings, *, eos_id: int, eot_id: int) -> tuple[int, ...]:
    """Token ids whose logits are set to -inf *after* sampling and before the confidence softmax.

    Upstream's shipped ``confidence_eos_eot_inf`` runs ``logits_with_noise[..., EOS] = logits[..., EoT] = -inf``.
    At temperature 0 ``add_gumbel_noise`` returns ``logits`` itself, so both ids are cleared; at temperature
    > 0 it returns a new tensor, so only EoT is cleared and EOS keeps its confidence (upstream issue #137).
    """
    if settings.confidence_eos_eot_inf_fixed:
        return (eos_id, eot_id)
    if settings.confidence_eos_eot_inf:
        return (eos_id, eot_id) if settings.temperature == 0 else (eot_id,)
    return ()


def window_start(canvas: np.ndarray, mask_id: int, block_start: int) -> int:
    """First canvas column a step can commit: the block start, or an earlier mask (infilling a prompt)."""
    masked = np.nonzero((canvas[:, :block_start] == mask_id).any(axis=0))[0]
    return int(masked[0]) if masked.size else block_start


def _divisor_hint(gen_length: int, block_length: int) -> int:
    divisors = [d for d in range(1, gen_length + 1) if gen_length % d == 0]
    return min(divisors, key=lambda d: abs(d - block_length))
