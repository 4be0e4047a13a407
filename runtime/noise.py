"""The sampler's uniform noise, drawn in one documented order so two engines can be fed the same numbers.

Per step, a sampler asks first for the Gumbel-max uniforms (temperature > 0), float64 of shape
``[batch, window, vocab]``, then for the random-remasking uniforms (``remasking="random"``), float32 of shape
``[batch, window]``. ``window`` is the slice of the canvas that can be committed in that step (the current block,
see :func:`llada_onnx.runtime.settings.window_start`). Upstream draws noise for the whole canvas; positions
outside the window can never be committed, so drawing only the window samples the same distribution.
"""

from __future__ import annotations

from typing import Callable, Union

import numpy as np

from .errors import InputError

UniformFn = Callable[[tuple, np.dtype], np.ndarray]
NoiseLike = Union["Noise", np.random.Generator, UniformFn, int, None]


class Noise:
    """Uniforms in [0, 1) from a numpy ``Generator`` (or a seed), or from a ``callable(shape, dtype)``."""

    def __init__(self, source: np.random.Generator | UniformFn):
        if isinstance(source, np.random.Generator):
            self._draw: UniformFn = lambda shape, dtype: source.random(shape, dtype=dtype)
        elif callable(source):
            self._draw = source
        else:
            raise TypeError(f"noise must be a numpy Generator, a seed or a callable(shape, dtype), got {source!r}")

    @classmethod
    def of(cls, noise: NoiseLike = None, seed: int | None = None) -> "Noise":
        """Normalise the samplers' ``noise``/``seed`` arguments; the default is ``default_rng(0)``."""
        if isinstance(noise, Noise):
            return noise
        if noise is not None and seed is not None:
            raise InputError("pass either `seed` or a noise source (`rng`), not both")
        if noise is None:
            noise = 0 if seed is None else seed
        if isinstance(noise, (int, np.integer)) and not isinstance(noise, bool):
            if noise < 0:
                raise InputError(f"`seed` must be a non-negative integer, got {noise}")
            noise = np.random.default_rng(noise)
        return cls(noise)

    def gumbel_uniforms(self, shape: tuple[int, ...]) -> np.ndarray:
        return self._checked(shape, np.float64)

    def remask_uniforms(self, shape: tuple[int, ...]) -> np.ndarray:
        return self._checked(shape, np.float32)

    def _checked(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        out = np.asarray(self._draw(tuple(shape), np.dtype(dtype)))
        if out.shape != tuple(shape):
            raise ValueError(f"noise source returned shape {out.shape}, expected {tuple(shape)}")
        return out.astype(dtype, copy=False)
