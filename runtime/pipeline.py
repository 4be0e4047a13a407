"""``Pipeline``: an export directory, loaded once, turned into a text (or token) generator."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .default_model import default_onnx_dir
from .errors import InputError
from .block_sampler import BlockRun, generate_block_ids
from .block_settings import BlockSettings
from .kv_cache import KVCacheSession
from .manifest import Manifest
from .noise import Noise, NoiseLike
from .providers import ProviderSpec
from .sampler import Callback, SamplerRun, generate_ids, new_run
from .session import GraphSession
from .settings import SamplerSettings
from .text import Prompts, TextCodec


class Pipeline:
    """One onnxruntime session and one tokenizer for an exported LLaDA model; build once, generate many times."""

    def __init__(self, graph: GraphSession):
        self.graph = graph
        self.manifest = graph.manifest

    @classmethod
    def from_pretrained(cls, onnx_dir: str | Path | None = None, provider: ProviderSpec = "cpu", *,
                        device_id: int = 0, threads: int | None = None,
                        session_options: ort.SessionOptions | None = None,
                        allow_fallback: bool = False, cuda_graphs: bool = True) -> "Pipeline":
        """Load an export directory made by ``llada-onnx export``; without one, the embedded default model.

        ``provider``: ``"cpu"``, ``"cuda"``, ``"dml"`` or an onnxruntime provider list. A provider this
        onnxruntime build lacks is an error unless ``allow_fallback`` (then a warning, and the CPU runs it).
        ``cuda_graphs``: on CUDA, replay the exact sampler's forwards and KV-cached steps as CUDA graphs (see
        :mod:`.captured_steps`).
        """
        manifest = Manifest.load(default_onnx_dir() if onnx_dir is None else onnx_dir)
        return cls(GraphSession(manifest, provider, device_id=device_id, threads=threads,
                                session_options=session_options, allow_fallback=allow_fallback,
                                cuda_graphs=cuda_graphs))

    @cached_property
    def kv_cache(self) -> KVCacheSession:
        """The export's KV-cache graph (``--cache`` exports), opened on first use the way the forward graph was
        (provider, device, threads, options, CUDA graphs), however the Pipeline was built."""
        return KVCacheSession(self.manifest, **self.graph.opened_with)

    @cached_property
    def codec(self) -> TextCodec:
        """The tokenizer, built once on first use (an export without tokenizer.json still runs generate_ids)."""
        return TextCodec.from_export(self.manifest)

    @property
    def provider(self) -> str:
        return self.graph.provider

    @property
    def block_diffusion(self) -> bool:
        """Whether the export runs the block-diffusion sampler (LLaDA2; its settings: :class:`BlockSettings`)."""
        return self.manifest.block_diffusion

    def forward_logits(self, input_ids, attention_mask=None, *, block_length: int | None = None) -> np.ndarray:
        """The mask predictor's logits at every position, float32 ``[batch, length, vocab]``: one forward pass of
        the export, for equivalence tests against the torch model (``attention_mask``: 1 = token, 0 = padding;
        ``block_length``: a block-diffusion export's block size, required there)."""
        if self.block_diffusion != (block_length is not None):
            raise InputError("`block_length` is required for a block-diffusion export and only there"
                             if self.block_diffusion else "this export has no blocks: leave `block_length` out")
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.manifest.vocab_size):
            raise InputError(f"input_ids must lie in [0, {self.manifest.vocab_size}), the model's vocabulary")
        positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape)
        return self.graph.run(ids, mask, np.ascontiguousarray(positions), logits=True,
                              block_length=block_length).logits

    def generate_ids(self, input_ids, attention_mask=None, *, seed: int | None = None, rng: NoiseLike = None,
                     callback: Callback | None = None, **settings: Any) -> np.ndarray:
        """The official sampler on token ids; returns the canvas ``[batch, prompt_len + gen_length]`` (int64).

        ``settings`` are the fields of :class:`SamplerSettings` (defaults: 128 tokens, blocks of 32, one step per
        token; early stop off, so the canvas is the full one unless asked). Same result as
        :func:`llada_onnx.models.sampler.generate`; ``seed`` or ``rng`` (a numpy Generator or
        ``callable(shape, dtype)``) supplies the noise, seed 0 by default. ``cache`` ("prefix" / "dual") needs an
        export made with ``--cache``. A block-diffusion export (LLaDA2) takes :class:`BlockSettings` instead (the
        official LLaDA2.0 ``generate()``'s arguments) and returns its canvas (see :mod:`.block_sampler`).
        """
        return self._generate_ids(input_ids, attention_mask, self.settings(settings), seed=seed, rng=rng,
                                  callback=callback)

    def settings(self, settings: dict[str, Any], *, text: bool = False) -> SamplerSettings | BlockSettings:
        """``settings`` checked as this export's sampler takes them (``text``: with the text defaults)."""
        if self.block_diffusion:
            return BlockSettings.of(settings)
        return SamplerSettings.of(settings, text=text)

    def new_run(self, input_ids: np.ndarray, attention_mask: np.ndarray | None,
                settings: SamplerSettings | BlockSettings, noise: Noise) -> SamplerRun | BlockRun:
        """One generation as a state machine (``next_call``/``take``) for a scheduler that interleaves many; a
        LLaDA run's model call is the scheduler's, a block-diffusion run brings its own (``run.call``, its cache)."""
        if self.block_diffusion:
            return BlockRun(self.graph, input_ids, attention_mask, settings, noise)
        return new_run(self.manifest, input_ids, attention_mask, settings, noise)

    def _generate_ids(self, input_ids, attention_mask, settings, *, seed: int | None = None,
                      rng: NoiseLike = None, callback=None) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        mask = None if attention_mask is None else np.asarray(attention_mask, dtype=np.int64).reshape(ids.shape)
        if self.block_diffusion:
            return generate_block_ids(self.graph, ids, mask, settings, noise=Noise.of(rng, seed), callback=callback)
        return generate_ids(self.graph, ids, mask, settings, noise=Noise.of(rng, seed), callback=callback,
                            cache_graph=self.kv_cache if settings.cache != "none" else None)

    def generate(self, prompts: Prompts, *, chat: bool | None = None, seed: int | None = None,
                 rng: NoiseLike = None, callback: Callback | None = None, **settings: Any) -> list[str]:
        """Generate text: ``prompts`` is a string, a list of strings, a conversation or a list of conversations.

        ``chat=None`` uses the model's chat template when it has one (Instruct) and raw text otherwise (base
        models). Settings are those of :meth:`generate_ids`. Each answer is cut at its first EOS/EoT. Early stop is
        on by default here: it cannot change the text (see :class:`SamplerSettings`).
        """
        resolved = self.settings(settings, text=True)
        ids, mask = self.codec.encode_batch(prompts, chat)
        out = self._generate_ids(ids, mask, resolved, seed=seed, rng=rng, callback=callback)
        return self.codec.decode_batch(out[:, ids.shape[1]:ids.shape[1] + resolved.gen_length])
