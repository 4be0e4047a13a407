"""The module that is traced to ONNX: the LLaDA model plus the sampler's per-position summaries.

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
        logits = self.model(input_ids, attention_mask, positions, always_mask=True)
        scores = logits.float()
        top_ids = torch.argmax(scores, dim=-1)
        top_score = torch.amax(scores, dim=-1, keepdim=True)
        # softmax(scores)[argmax] == exp(0) / sum(exp(scores - max)), computed stably in float32.
        top_prob = torch.reciprocal(torch.exp(scores - top_score).sum(dim=-1))
        return logits, top_ids, top_prob
