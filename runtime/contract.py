"""The graph contract: every graph an export holds, its inputs and outputs, and the model sizes the runtime needs.

The exporter traces graphs with exactly these names and the runtime binds exactly these names; both import them
from here. Changing a graph's inputs, outputs or meaning is a new :data:`FORMAT_VERSION`, recorded as the kind's
``since``: the runtime refuses an export holding a kind older than that (or made by a newer llada-onnx) with
"re-export" rather than guessing from the names a graph happens to have; exports of unchanged kinds still load.

Dimensions: ``batch``; ``length`` (the whole canvas, prompt + generation); ``count`` (the positions whose
predictions are wanted: the sampler asks for the masked positions it can commit, so the vocabulary-sized head
runs on those rows only); ``fed`` (the tokens a KV-cached call runs); ``past`` (cached positions ``[0, past)``).
"graph" as a dtype is the export's float type (fp32 or fp16).
"""

from __future__ import annotations

import dataclasses

import numpy as np

FORMAT_VERSION = 3
MANIFEST_FILE = "llada_onnx.json"


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # "int64", "float32", or "graph" (the export's float type)
    shape: tuple[str, ...]
    meaning: str


@dataclasses.dataclass(frozen=True)
class GraphKind:
    """One kind of graph an export may hold. ``per_layer_inputs``/``per_layer_outputs`` are name patterns with
    ``{i}`` for the layer index, repeated for every layer after the fixed tensors."""

    name: str  # the key in the manifest's "graphs"
    file: str
    since: int  # the FORMAT_VERSION that last changed this kind: older exports holding it are refused
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    per_layer_inputs: tuple[Tensor, ...] = ()
    per_layer_outputs: tuple[Tensor, ...] = ()
    meaning: str = ""

    def input_names(self, n_layers: int) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs) + self.layer_input_names(n_layers)

    def output_names(self, n_layers: int) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs) + self.layer_output_names(n_layers)

    def layer_input_names(self, n_layers: int) -> tuple[str, ...]:
        return _layer_names(self.per_layer_inputs, n_layers)

    def layer_output_names(self, n_layers: int) -> tuple[str, ...]:
        return _layer_names(self.per_layer_outputs, n_layers)


def _layer_names(tensors: tuple[Tensor, ...], n_layers: int) -> tuple[str, ...]:
    return tuple(t.name.format(i=i) for i in range(n_layers) for t in tensors)


SUMMARIES = (
    Tensor("logits", "graph", ("batch", "count", "vocab"), "the LM head's logits at the asked positions"),
    Tensor("top_ids", "int64", ("batch", "count"), "argmax of the logits, the first index on ties"),
    Tensor("top_prob", "float32", ("batch", "count"), "softmax probability of top_ids, computed stably"),
)


@dataclasses.dataclass
class StepOutput:
    """A sampler graph call's :data:`SUMMARIES` on the host (``logits`` only when the step asked for them)."""

    top_ids: np.ndarray  # int64 [batch, count]
    top_prob: np.ndarray  # float32 [batch, count]
    logits: np.ndarray | None  # float32 [batch, count, vocab], only when asked for

    def rows(self, index: list[int]) -> "StepOutput":
        """The outputs of the rows ``index`` (itself when that is every row, in order)."""
        if index == list(range(len(self.top_ids))):
            return self
        logits = None if self.logits is None else self.logits[index]
        return StepOutput(self.top_ids[index], self.top_prob[index], logits)


FORWARD = GraphKind(
    name="forward", file="model.onnx", since=2,
    meaning="the mask predictor over the whole canvas (bidirectional attention, padded keys masked)",
    inputs=(
        Tensor("input_ids", "int64", ("batch", "length"), "the canvas: prompt, committed and mask tokens"),
        Tensor("attention_mask", "int64", ("batch", "length"), "1 = token, 0 = left padding"),
        Tensor("positions", "int64", ("batch", "count"), "canvas positions whose predictions are wanted"),
    ),
    outputs=SUMMARIES,
)

KV_CACHE = GraphKind(
    name="kv_cache", file="cache.onnx", since=2,
    meaning="block-wise KV caching (Fast-dLLM): with an empty past, the whole canvas fed is a refresh whose "
            "presents are the new cache; the current block (dual) or everything from it on (prefix) fed against "
            "a past of the whole canvas is a cached step, attending to the cache for every other position",
    inputs=(
        Tensor("input_ids", "int64", ("batch", "fed"), "the fed tokens"),
        Tensor("attention_mask", "int64", ("batch", "length"), "the whole canvas's padding mask"),
        Tensor("positions", "int64", ("batch", "fed"), "where the fed tokens stand in the canvas"),
        Tensor("head_index", "int64", ("batch", "count"), "which fed tokens to predict"),
    ),
    per_layer_inputs=(
        Tensor("past_keys_{i}", "graph", ("batch", "n_kv_heads", "past", "head_dim"), "post-RoPE cached keys"),
        Tensor("past_values_{i}", "graph", ("batch", "n_kv_heads", "past", "head_dim"), "cached values"),
    ),
    outputs=SUMMARIES,
    per_layer_outputs=(
        Tensor("present_keys_{i}", "graph", ("batch", "n_kv_heads", "fed", "head_dim"), "the fed tokens' keys"),
        Tensor("present_values_{i}", "graph", ("batch", "n_kv_heads", "fed", "head_dim"), "their values"),
    ),
)

BLOCK_FORWARD = GraphKind(
    name="block_forward", file="model.onnx", since=3,
    meaning="block diffusion (LLaDA2): the mask predictor with block-causal attention (a token sees its own block "
            "and the ones before it; blocks of block_length counted from each row's first token, padded keys "
            "masked). The fed tokens attend to the past, the keys/values of whole finished blocks before them "
            "(exact: finished blocks never change), and to each other; an empty past and the whole canvas fed is "
            "the full forward. The presents are the fed tokens' keys/values, the past of later calls",
    inputs=(
        Tensor("input_ids", "int64", ("batch", "fed"), "the fed tokens"),
        Tensor("attention_mask", "int64", ("batch", "fed"), "1 = token, 0 = padding, of the fed tokens"),
        Tensor("positions", "int64", ("batch", "count"), "which fed tokens to predict"),
        Tensor("block_length", "int64", (), "tokens per block"),
        Tensor("cached_mask", "int64", ("batch", "past"), "1 = token, 0 = padding, of the cached positions"),
    ),
    per_layer_inputs=KV_CACHE.per_layer_inputs,
    outputs=SUMMARIES,
    per_layer_outputs=KV_CACHE.per_layer_outputs,
)

GRAPH_KINDS = {kind.name: kind for kind in (FORWARD, KV_CACHE, BLOCK_FORWARD)}
MAIN_KINDS = (FORWARD.name, BLOCK_FORWARD.name)  # an export holds exactly one of these, its main graph


@dataclasses.dataclass(frozen=True)
class ModelSizes:
    """What the runtime needs to know of the model: to shape caches and buffers, never to rebuild it."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_sequence_length: int
