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


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[2I, H]`` with rows gate_0, up_0, gate_1, up_1, ..."""
    return torch.stack([gate, up], dim=1).reshape(2 * gate.shape[0], gate.shape[1])


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
