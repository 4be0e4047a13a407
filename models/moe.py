"""The mixture-of-SwiGLU-experts op of LLaDA-MoE, as one torch custom op (``llada_onnx::moe_swiglu``).

One op, so that the exporter can write it in the form the target provider runs best
(:mod:`llada_onnx.export.moe`): onnxruntime's fused ``com.microsoft.MoE`` kernel, or standard ONNX ops for
providers without it. Its eager implementation is the official routing (softmax over all experts in float32,
top-k, the raw top-k probabilities as mixing weights, no renormalisation) with each token run through its k
experts only.

Weights are stacked per expert in ``nn.Linear``'s ``[out, in]`` layout, as ``com.microsoft.MoE`` reads them:
``fc1`` ``[E, 2I, H]`` with each expert's gate and up rows interleaved (``swiglu_fusion=1``), ``fc2`` ``[E, H, I]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[2I, H]`` with rows gate_0, up_0, gate_1, up_1, ..."""
    return torch.stack([gate, up], dim=1).reshape(2 * gate.shape[0], gate.shape[1])


class StackedExperts(nn.Module):
    """A mixture whose ``experts`` (each with ``gate_proj``/``up_proj``/``down_proj``, the official names) run
    through one of the ops here: :meth:`stacked` gives their weights in the ops' layout, :meth:`stack_experts`
    keeps them that way (for export: two tensors instead of three per expert)."""

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``fc1`` ``[E, 2I, H]`` (gate and up rows interleaved) and ``fc2`` ``[E, H, I]``."""
        if hasattr(self, "fc1"):
            return self.fc1, self.fc2
        fc1 = torch.stack([interleave_gate_up(e.gate_proj.weight, e.up_proj.weight) for e in self.experts])
        return fc1, torch.stack([e.down_proj.weight for e in self.experts])

    def stack_experts(self) -> None:
        with torch.no_grad():
            fc1, fc2 = self.stacked()
            self.fc1, self.fc2 = nn.Parameter(fc1, requires_grad=False), nn.Parameter(fc2, requires_grad=False)
        del self.experts


@torch.library.custom_op("llada_onnx::moe_swiglu", mutates_args=())
def moe_swiglu(x: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor,
               k: int) -> torch.Tensor:
    """``x`` ``[T, H]``, ``router_logits`` ``[T, E]`` -> ``[T, H]``."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, chosen = torch.topk(probs, k, dim=-1)
    weights = weights.to(x.dtype)
    out = torch.zeros_like(x)
    for expert in torch.unique(chosen).tolist():
        rows, slot = torch.nonzero(chosen == expert, as_tuple=True)
        h = x[rows] @ fc1[expert].T
        act = F.silu(h[:, 0::2]) * h[:, 1::2]
        out.index_add_(0, rows, (act @ fc2[expert].T) * weights[rows, slot, None])
    return out


@moe_swiglu.register_fake
def _(x, router_logits, fc1, fc2, k):
    return torch.empty_like(x)


def grouped_routing(router_logits: torch.Tensor, expert_bias: torch.Tensor, k: int, n_group: int, topk_group: int,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA2's (DeepSeek-style) router on ``router_logits`` ``[T, E]``: ``(experts [T, k], weights [T, k])``.

    Sigmoid scores plus ``expert_bias`` select: the experts form ``n_group`` groups, each scored by the sum of its
    two best selection scores; the best ``topk_group`` groups are kept and the top ``k`` experts among them chosen.
    The *unbiased* scores of the chosen experts, renormalised, times ``scale``, mix them. All in float32."""
    scores = torch.sigmoid(router_logits.float())
    selection = scores + expert_bias.float()
    t, e = selection.shape
    group_scores = selection.view(t, n_group, -1).topk(2, dim=-1).values.sum(dim=-1)
    groups = group_scores.topk(topk_group, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_scores).scatter_(1, groups, 1.0).bool()
    keep = keep[:, :, None].expand(t, n_group, e // n_group).reshape(t, e)
    experts = selection.masked_fill(~keep, float("-inf")).topk(k, dim=-1).indices
    chosen = scores.gather(1, experts)
    if k > 1:
        chosen = chosen / (chosen.sum(dim=-1, keepdim=True) + 1e-20)
    return experts, chosen * scale


@torch.library.custom_op("llada_onnx::moe_grouped_swiglu", mutates_args=())
def moe_grouped_swiglu(x: torch.Tensor, router_logits: torch.Tensor, expert_bias: torch.Tensor, fc1: torch.Tensor,
                       fc2: torch.Tensor, k: int, n_group: int, topk_group: int, scale: float) -> torch.Tensor:
    """LLaDA2's routed experts (the shared expert is not part of it): ``x`` ``[T, H]``, ``router_logits`` ``[T, E]``
    float32 -> ``[T, H]``; weights as :func:`moe_swiglu`'s. Mixed in float32, as the official code."""
    experts, weights = grouped_routing(router_logits, expert_bias, k, n_group, topk_group, scale)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in torch.unique(experts).tolist():
        rows, slot = torch.nonzero(experts == expert, as_tuple=True)
        h = x[rows] @ fc1[expert].T
        act = F.silu(h[:, 0::2]) * h[:, 1::2]
        out.index_add_(0, rows, (act @ fc2[expert].T).float() * weights[rows, slot, None])
    return out.to(x.dtype)


@moe_grouped_swiglu.register_fake
def _(x, router_logits, expert_bias, fc1, fc2, k, n_group, topk_group, scale):
    return torch.empty_like(x)
