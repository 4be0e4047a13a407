"""Sampler settings: every knob declared once, with its default, its valid range and what it means.

``Pipeline.generate_ids``/``generate``, the torch reference sampler and the CLI's flags (generated from
:func:`knobs`) all take these fields, so the defaults and the checks are the same wherever a generation starts.
The defaults are the official demo's: 128 tokens in blocks of 32, one step per token. ``steps`` left unset
follows ``gen_length``, and a block never outgrows the generation (``block_length`` is clamped to it), so
``gen_length=64`` alone is a valid request everywhere. A bad setting raises :class:`~.errors.InputError` naming
the setting (the CLI shows its flag).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .errors import InputError

REMASKING = ("low_confidence", "random")
CACHE_MODES = ("none", "prefix", "dual")
DEFAULT_GEN_LENGTH = 128
DEFAULT_BLOCK_LENGTH = 32


def _knob(default: Any, help: str, *, kind: type, choices: tuple[str, ...] | None = None,
          text_default: Any = dataclasses.MISSING) -> Any:
    """A settings field; ``kind`` is its value type (bool: a switch), ``text_default`` its default when the
    result is text (CLI, ``Pipeline.generate``) rather than token ids, where that differs."""
    metadata = {"help": help, "kind": kind, "choices": choices}
    if text_default is not dataclasses.MISSING:
        metadata["text_default"] = text_default
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """The sampler's knobs (see each field's ``help`` in :func:`knobs`, or ``llada-onnx generate --help``).

    ``confidence_eos_eot_inf`` reproduces upstream exactly, bug included (see :func:`suppressed_confidence_ids`);
    ``confidence_eos_eot_inf_fixed`` is what upstream intended. Fast decoding (see :mod:`.policies` and
    :mod:`.kv_cache`): ``threshold`` or ``factor`` replace the fixed per-step count by a confidence rule, and each
    block then runs until it has no mask left (``steps`` is not used); ``cache`` runs a block's steps against
    keys/values cached at its first step (approximate). ``early_stop`` ends the generation once every row has an
    EOS/EoT in a completed block and fills the rest with the pad id: the text up to the first stop token is then
    final, so decoded text is unchanged (on by default for text, off for token ids).
    """

    gen_length: int = _knob(DEFAULT_GEN_LENGTH, "tokens to generate", kind=int)
    steps: int | None = _knob(None, "denoising steps over all blocks (default: the gen length)", kind=int)
    block_length: int | None = _knob(
        None, f"tokens per block, decoded left to right (default {DEFAULT_BLOCK_LENGTH}; at most the gen length)",
        kind=int)
    temperature: float = _knob(0.0, "Gumbel-max sampling temperature (0 = greedy)", kind=float)
    cfg_scale: float = _knob(0.0, "classifier-free guidance scale (0 = off)", kind=float)
    remasking: str = _knob("low_confidence", "which masked tokens a step commits: the most confident ones, or "
                           "random ones", kind=str, choices=REMASKING)
    logits_eos_inf: bool = _knob(False, "never sample EOS", kind=bool)
    confidence_eos_eot_inf: bool = _knob(False, "upstream's EOS/EoT confidence option, exactly as shipped", kind=bool)
    confidence_eos_eot_inf_fixed: bool = _knob(
        False, "the intended behaviour: EOS and EoT get confidence 0 at every temperature", kind=bool)
    allow_mask_in_prompt: bool = _knob(False, "let mask tokens in the prompt be filled in (infilling) instead of "
                                       "refusing them", kind=bool)
    threshold: float | None = _knob(
        None, "fast decoding: each step commits every masked token of the block with confidence >= T (at least "
        "one); blocks run until filled and steps is not used (Fast-dLLM: 0.9)", kind=float)
    factor: float | None = _knob(
        None, "fast decoding: Fast-dLLM's factor rule, commit the n most confident tokens with "
        "(n + 1) * (1 - c_n) < F (at least one)", kind=float)
    cache: str = _knob("none", "fast decoding: run a block's steps against keys/values cached at its first step "
                       "(needs an export made with --cache; approximate)", kind=str, choices=CACHE_MODES)
    refresh_every: int | None = _knob(None, "with a cache, refresh it every N steps too", kind=int)
    early_stop: bool = _knob(False, "stop once every answer has ended (the text is the same)", kind=bool,
                             text_default=True)

    def __post_init__(self) -> None:
        for name in ("gen_length", "steps", "block_length", "refresh_every"):
            value = getattr(self, name)
            integer = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            if (value is not None or name == "gen_length") and (not integer or value < 1):
                raise InputError(f"`{name}` must be a positive integer, got {value!r}")
        for name in ("logits_eos_inf", "confidence_eos_eot_inf", "confidence_eos_eot_inf_fixed",
                     "allow_mask_in_prompt", "early_stop"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InputError(f"`{name}` must be True or False, got {getattr(self, name)!r}")
        for name in ("remasking", "cache"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"`{name}` must be a string, got {getattr(self, name)!r}")
        for name in ("temperature", "cfg_scale", "threshold", "factor"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                                      or not np.isfinite(value)):
                raise InputError(f"`{name}` must be a finite number, got {value!r}")
        block = min(DEFAULT_BLOCK_LENGTH if self.block_length is None else int(self.block_length),
                    int(self.gen_length))
        object.__setattr__(self, "block_length", block)
        object.__setattr__(self, "steps", int(self.gen_length if self.steps is None else self.steps))
        if self.gen_length % self.block_length:
            raise InputError(
                f"`gen_length` ({self.gen_length}) must be a multiple of `block_length` ({self.block_length}); "
                f"e.g. `block_length` {_divisor_hint(self.gen_length, self.block_length)}")
        if self.steps % self.num_blocks:
            raise InputError(
                f"`steps` ({self.steps}) is the total over {self.num_blocks} blocks and must be a multiple of it; "
                f"e.g. `steps` {max(1, self.steps // self.num_blocks) * self.num_blocks}")
        if self.temperature < 0:
            raise InputError(f"`temperature` must be >= 0 (0 = greedy), got {self.temperature}")
        if self.cfg_scale < 0:
            raise InputError(f"`cfg_scale` must be >= 0 (0 = no classifier-free guidance), got {self.cfg_scale}")
        if self.remasking not in REMASKING:
            raise InputError(f"unknown `remasking` {self.remasking!r}; use one of {', '.join(REMASKING)}")
        if self.threshold is not None and self.factor is not None:
            raise InputError("set either `threshold` or `factor` (two parallel-decoding rules), not both")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise InputError(f"`threshold` must be in (0, 1] (a confidence; Fast-dLLM uses 0.9), "
                             f"got {self.threshold}")
        if self.factor is not None and not self.factor > 0:
            raise InputError(f"`factor` must be > 0 (Fast-dLLM uses 1.0), got {self.factor}")
        if self.parallel and self.remasking != "low_confidence":
            raise InputError("`threshold` and `factor` decoding rank by confidence: use `remasking` low_confidence")
        if self.cache not in CACHE_MODES:
            raise InputError(f"unknown `cache` {self.cache!r}; use one of {', '.join(CACHE_MODES)}")
        if self.refresh_every is not None and self.cache == "none":
            raise InputError("`refresh_every` needs `cache` prefix or dual")
        if self.confidence_eos_eot_inf and self.confidence_eos_eot_inf_fixed:
            raise InputError("set either `confidence_eos_eot_inf` (upstream's shipped behaviour) or "
                             "`confidence_eos_eot_inf_fixed` (the intended one), not both")

    @classmethod
    def of(cls, settings: dict[str, Any], *, text: bool = False) -> "SamplerSettings":
        """Settings from keyword arguments, refusing unknown names; a None value is a setting left unset (its
        default applies); ``text``: a text result, where a field's ``text_default`` replaces its default."""
        names = [f.name for f in knobs()]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise InputError(f"unknown sampler setting(s) {', '.join(unknown)}; the settings are {', '.join(names)}")
        defaults = {f.name: f.metadata["text_default"] for f in knobs() if text and "text_default" in f.metadata}
        return cls(**{**defaults, **{k: v for k, v in settings.items() if v is not None}})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
            raise InputError(f"prompt must be a [batch, length] array with batch >= 1, got shape {prompt.shape}")
        if attention_mask is not None and attention_mask.shape != prompt.shape:
            raise InputError(f"attention_mask shape {attention_mask.shape} differs from prompt shape {prompt.shape}")
        total = prompt.shape[1] + self.gen_length
        if total > max_length:
            raise InputError(
                f"prompt length {prompt.shape[1]} + `gen_length` {self.gen_length} = {total} exceeds the model's "
                f"max_sequence_length {max_length}; shorten the prompt or lower `gen_length`")
        if pad_id == mask_id:
            raise InputError(f"the pad id equals the mask id ({mask_id}): padding would be generated over; "
                             "pad with the EOS/pad id instead")
        if not self.allow_mask_in_prompt and bool((prompt == mask_id).any()):
            rows = sorted({int(r) for r in np.nonzero(prompt == mask_id)[0]})
            raise InputError(
                f"the prompt contains the mask id {mask_id} (rows {rows[:5]}); it would be generated over. "
                "Remove it, or pass `allow_mask_in_prompt` to infill those positions")


def knobs() -> tuple[dataclasses.Field, ...]:
    """The settings fields, each with ``metadata`` ``help``, ``kind``, ``choices`` (and maybe ``text_default``)."""
    return dataclasses.fields(SamplerSettings)


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
