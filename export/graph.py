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
    def __init__(self, model: LLaDAModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor):
        return summaries(self.model(input_ids, attention_mask, positions, always_mask=True))


class CachedSamplerGraph(nn.Module):
    """The block-wise KV-cache graph (``cache.onnx``): fed tokens at canvas ``positions`` against cached keys/values.

    Inputs: ``input_ids`` ``[B, n]``, ``attention_mask`` ``[B, L]`` (the whole canvas), ``positions`` ``[B, n]``
    (where the fed tokens stand), ``head_index`` ``[B, c]`` (which fed tokens to predict), ``past_keys`` and
    ``past_values`` ``[n_layers, B, n_kv_heads, L, head_dim]``. Outputs: ``logits``/``top_ids``/``top_prob`` for
    the ``c`` tokens, as in the main graph, and ``present_keys``/``present_values`` of the fed tokens. Feeding the
    whole canvas is a refresh (its presents are the new cache; the past is then fully masked and may be zeros);
    feeding the block (dual cache) or the block and everything after it (prefix cache) is a cached step.
    See :meth:`LLaDAModel.cached_hidden_states`.
    """

    def __init__(self, model: LLaDAModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, positions, head_index, past_keys, past_values):
        h, keys, values = self.model.cached_hidden_states(input_ids, attention_mask, positions, past_keys,
                                                          past_values)
        h = torch.gather(h, 1, head_index[:, :, None].expand(-1, -1, h.shape[-1]))
        return (*summaries(self.model.lm_head(h)), keys, values)


def summaries(logits: torch.Tensor):
    """``(logits, top_ids, top_prob)`` of the main graph's contract."""
    scores = logits.float()
    # TopK(k=1) rather than ArgMax + ReduceMax: the same values and the same first-index tie rule (ONNX TopK
    # orders equal values by index), but onnxruntime's CUDA ArgMax/ReduceMax go through a cuDNN reduction that
    # took 7.9 ms for one [1, 32, 126464] row block on an H100 (the whole rest of a 4-layer 8B-wide step: 2.3 ms).
    top_score, top_ids = torch.topk(scores, 1, dim=-1)
    # softmax(scores)[argmax] == exp(0) / sum(exp(scores - max)), computed stably in float32.
    top_prob = torch.reciprocal(torch.exp(scores - top_score).sum(dim=-1))
    return logits, top_ids[..., 0], top_prob
