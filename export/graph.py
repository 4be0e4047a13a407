"""The modules that are traced to ONNX: the LLaDA model plus the sampler's per-position summaries.

Besides the logits of the requested ``positions`` it emits ``top_ids`` (argmax, first index on ties, as
``torch.argmax``) and ``top_prob`` (the softmax probability of that argmax). The greedy ``low_confidence`` path
of the sampler needs only these two ``[batch, count]`` tensors, so the runtime never has to copy a
vocabulary-sized tensor to the host on that path.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.modeling import LLaDAModel


class SamplerGraph(nn.Module):
    """The main graph; ``device`` is the one the export targets and picks the summaries' ops (:func:`summaries`)."""

    def __init__(self, model: LLaDAModel, device: str = "cpu"):
        super().__init__()
        self.model = model
        self.device = device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor):
        return summaries(self.model(input_ids, attention_mask, positions, always_mask=True), self.device)


class BlockSamplerGraph(nn.Module):
    """The graph of a block-diffusion model (``block_forward``): the fed tokens against the keys/values of finished
    blocks (``past``; empty: the full forward), the block length an input so one export serves every block size.
    Outputs :class:`SamplerGraph`'s, then per layer the fed tokens' keys and values. See
    :meth:`~llada_onnx.models.llada2.LLaDA2Model.hidden_states`."""

    def __init__(self, model: nn.Module, device: str = "cpu"):
        super().__init__()
        self.model = model
        self.device = device

    def forward(self, input_ids, attention_mask, positions, block_length, cached_mask, *past):
        h, presents = self.model.hidden_states(input_ids, attention_mask, block_length,
                                               list(zip(past[0::2], past[1::2])), cached_mask)
        return with_presents(self.model, h, positions, presents, self.device)


class CachedSamplerGraph(nn.Module):
    """The block-wise KV-cache graph (``cache.onnx``): fed tokens at canvas ``positions`` against cached keys/values.

    Inputs: ``input_ids`` ``[B, n]``, ``attention_mask`` ``[B, L]`` (the whole canvas), ``positions`` ``[B, n]``
    (where the fed tokens stand), ``head_index`` ``[B, c]`` (which fed tokens to predict), then per layer ``i``
    ``past_keys_i`` and ``past_values_i`` ``[B, n_kv_heads, P, head_dim]`` (canvas positions ``[0, P)``).
    Outputs: ``logits``/``top_ids``/``top_prob`` for the ``c`` tokens, as in the main graph, then per layer
    ``present_keys_i``/``present_values_i`` of the fed tokens. Feeding the whole canvas with an empty past
    (``P = 0``) is a refresh (its presents are the new cache); feeding the block (dual cache) or the block and
    everything after it (prefix cache) against the cache (``P = L``) is a cached step. One input per layer, not
    one stacked tensor: slicing a stacked cache into layers would copy all of it on every step.
    See :meth:`LLaDAModel.cached_hidden_states`.
    """

    def __init__(self, model: LLaDAModel, device: str = "cpu"):
        super().__init__()
        self.model = model
        self.device = device

    def forward(self, input_ids, attention_mask, positions, head_index, *past):
        layers = list(zip(past[0::2], past[1::2]))
        h, presents = self.model.cached_hidden_states(input_ids, attention_mask, positions, layers)
        return with_presents(self.model, h, head_index, presents, self.device)


def with_presents(model: nn.Module, h: torch.Tensor, index: torch.Tensor, presents, device: str):
    """The outputs of a graph with a past: the summaries of the fed tokens ``index`` picks from the hidden states
    ``h``, then each layer's keys and values."""
    h = torch.gather(h, 1, index[:, :, None].expand(-1, -1, h.shape[-1]))
    return (*summaries(model.lm_head(h), device), *(t for kv in presents for t in kv))


def summaries(logits: torch.Tensor, device: str = "cpu"):
    """``(logits, top_ids, top_prob)`` of the main graph's contract, in the ops fastest on ``device``.

    Both forms give the argmax with the first index on ties (as ``torch.argmax``) and the softmax probability of
    it. On the CPU, ArgMax plus the max of a Softmax (vectorised kernels) take a third of the time of TopK(k=1)
    followed by an explicit exp-sum: 54 against 166 us for 32 rows of 4,096. On CUDA, onnxruntime's
    ArgMax/ReduceMax go through a cuDNN reduction that took 7.9 ms for one [1, 32, 126464] row block on an H100
    (the whole rest of a 4-layer 8B-wide step: 2.3 ms), so there it is TopK (ONNX TopK orders equal values by
    index) and ``1 / sum(exp(scores - max))``.
    """
    scores = logits.float()
    if device == "cpu":
        return logits, torch.argmax(scores, dim=-1), torch.softmax(scores, dim=-1).amax(dim=-1)
    top_score, top_ids = torch.topk(scores, 1, dim=-1)
    # softmax(scores)[argmax] == exp(0) / sum(exp(scores - max)), computed stably in float32.
    top_prob = torch.reciprocal(torch.exp(scores - top_score).sum(dim=-1))
    return logits, top_ids[..., 0], top_prob
