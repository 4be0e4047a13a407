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
        # TopK(k=1) rather than ArgMax + ReduceMax: the same values and the same first-index tie rule (ONNX TopK
        # orders equal values by index), but onnxruntime's CUDA ArgMax/ReduceMax go through a cuDNN reduction that
        # took 7.9 ms for one [1, 32, 126464] row block on an H100 (the whole rest of a 4-layer 8B-wide step: 2.3 ms).
        top_score, top_ids = torch.topk(scores, 1, dim=-1)
        # softmax(scores)[argmax] == exp(0) / sum(exp(scores - max)), computed stably in float32.
        top_prob = torch.reciprocal(torch.exp(scores - top_score).sum(dim=-1))
        return logits, top_ids[..., 0], top_prob
