"""How the expert ops are written to ONNX: LLaDA-MoE's :func:`~llada_onnx.models.moe.moe_swiglu` and LLaDA2's
:func:`~llada_onnx.models.moe.moe_grouped_swiglu`.

* ``fused`` (the default): onnxruntime's ``com.microsoft.MoE`` kernel (CPU fp32, CUDA), which takes the router
  logits and does the softmax, the top-k and the experts itself: ``k`` experts per token, ``swiglu`` with
  alpha 1 and beta 0 (``silu(gate) * up``), gate and up rows interleaved (``swiglu_fusion=1``), and no
  renormalisation of the top-k weights (``normalize_routing_weights=0``), which is the official routing.
* ``decomposed``: standard ONNX ops only, for providers without that kernel (DirectML) at the default opset.
  Softmax and TopK give the routing, scattered into a dense ``[tokens, experts]`` weight matrix; every expert
  runs on every token as one batched MatMul and the weighted sum keeps the chosen ones. That is
  ``experts / k`` times the fused kernel's expert arithmetic (8x for the real 64-expert, top-8 model): a
  portable fallback, not the fast path.

LLaDA2's router (sigmoid scores plus a selection-only bias, group-limited top-k, the unbiased scores renormalised
and scaled) is not the ``MoE`` kernel's softmax, so its choice is made in standard ops first. The fused form then
hands the kernel, as router logits, ``log(score)`` for the chosen experts and a large negative value for the rest:
the kernel's softmax over those is exactly the chosen scores renormalised, and its top-k picks exactly the chosen
experts. The routed output is then scaled by ``routed_scaling_factor``; the shared expert is an ordinary MLP.
"""

from __future__ import annotations

import onnxscript
from onnxscript import opset18 as op

MOE_FORMS = ("fused", "decomposed")
MICROSOFT = onnxscript.values.Opset("com.microsoft", 1)


def _register_moe_schema() -> None:
    """onnxscript builds a node from its op's ONNX schema; onnx has none for onnxruntime's contrib ``MoE``, so
    its signature (as onnxruntime declares it, the inputs and attributes used here) is registered once."""
    from onnx import defs

    if defs.has("MoE", "com.microsoft"):
        return
    param = defs.OpSchema.FormalParameter
    optional = defs.OpSchema.FormalParameterOption.Optional
    attr = defs.OpSchema.Attribute
    kinds = defs.OpSchema.AttrType
    defs.register_schema(defs.OpSchema(
        "MoE", "com.microsoft", 1,
        inputs=[param("input", "T"), param("router_probs", "T"), param("fc1_experts_weights", "T"),
                param("fc1_experts_bias", "T", param_option=optional), param("fc2_experts_weights", "T"),
                param("fc2_experts_bias", "T", param_option=optional),
                param("fc3_experts_weights", "T", param_option=optional),
                param("fc3_experts_bias", "T", param_option=optional)],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
        attributes=[attr("k", kinds.INT, ""), attr("activation_type", kinds.STRING, ""),
                    attr("swiglu_fusion", kinds.INT, ""), attr("activation_alpha", kinds.FLOAT, ""),
                    attr("activation_beta", kinds.FLOAT, ""), attr("normalize_routing_weights", kinds.INT, "")]))


def fused_moe(x, router_logits, fc1, fc2, k: int):
    return MICROSOFT.MoE(x, router_logits, fc1, None, fc2, k=k, activation_type="swiglu", swiglu_fusion=1,
                         activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=0)


def decomposed_moe(x, router_logits, fc1, fc2, k: int):
    probs = op.Softmax(op.Cast(router_logits, to=1), axis=-1)  # [T, E] in float32 (1), as the official
    top, chosen = op.TopK(probs, op.Constant(value_ints=[k]), axis=-1)
    return _every_expert(x, _dense_weights(probs, chosen, top), fc1, fc2)


def _dense_weights(like, chosen, weights):
    """``[T, E]`` mixing weights: ``weights`` at the ``chosen`` experts, 0 elsewhere."""
    return op.ScatterElements(op.Mul(like, op.Constant(value_float=0.0)), chosen, weights, axis=1)


def _every_expert(x, weights, fc1, fc2):
    """Every expert on every token as one batched MatMul, summed with the dense ``weights`` ``[T, E]``."""
    weights = op.CastLike(weights, x)
    h = op.MatMul(op.Unsqueeze(x, op.Constant(value_ints=[0])), op.Transpose(fc1, perm=[0, 2, 1]))  # [E, T, 2I]
    two_i, last, every_other = op.Shape(fc1, start=1, end=2), op.Constant(value_ints=[-1]), op.Constant(value_ints=[2])
    gate = op.Slice(h, op.Constant(value_ints=[0]), two_i, last, every_other)  # the interleaved rows 0, 2, ...
    up = op.Slice(h, op.Constant(value_ints=[1]), two_i, last, every_other)  # and 1, 3, ...
    act = op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)
    out = op.MatMul(act, op.Transpose(fc2, perm=[0, 2, 1]))  # [E, T, H]
    mix = op.Unsqueeze(op.Transpose(weights, perm=[1, 0]), op.Constant(value_ints=[2]))  # [E, T, 1]
    return op.ReduceSum(op.Mul(out, mix), op.Constant(value_ints=[0]), keepdims=0)


def _grouped_choice(router_logits, expert_bias, k: int, n_group: int, topk_group: int):
    """LLaDA2's selection in standard ops: ``(sigmoid scores [T, E] float32, chosen experts [T, k])``."""
    scores = op.Sigmoid(op.Cast(router_logits, to=1))
    selection = op.Add(scores, op.Cast(expert_bias, to=1))
    grouped = op.Reshape(selection, op.Constant(value_ints=[0, n_group, -1]))  # [T, G, E/G]
    best_two, _ = op.TopK(grouped, op.Constant(value_ints=[2]), axis=-1)
    group_scores = op.ReduceSum(best_two, op.Constant(value_ints=[-1]), keepdims=0)  # [T, G]
    _, groups = op.TopK(group_scores, op.Constant(value_ints=[topk_group]), axis=-1)
    ones = op.Expand(op.Constant(value_float=1.0), op.Shape(groups))
    kept = op.ScatterElements(op.Mul(group_scores, op.Constant(value_float=0.0)), groups, ones, axis=1)
    kept = op.Reshape(op.Expand(op.Unsqueeze(kept, op.Constant(value_ints=[2])), op.Shape(grouped)),
                      op.Shape(selection))  # [T, E]: 1 for the experts of kept groups
    masked = op.Where(op.Cast(kept, to=9), selection, op.Constant(value_float=float("-inf")))
    _, chosen = op.TopK(masked, op.Constant(value_ints=[k]), axis=-1)
    return scores, chosen


def fused_grouped_moe(x, router_logits, expert_bias, fc1, fc2, k: int, n_group: int, topk_group: int,
                      scale: float):
    scores, chosen = _grouped_choice(router_logits, expert_bias, k, n_group, topk_group)
    floor = op.Expand(op.Constant(value_float=-1e4), op.Shape(scores))  # softmax weight exp(-1e4 - max) = 0
    logits = op.ScatterElements(floor, chosen, op.Log(op.GatherElements(scores, chosen, axis=1)), axis=1)
    out = MICROSOFT.MoE(x, op.CastLike(logits, x), fc1, None, fc2, k=k, activation_type="swiglu",
                        swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=0)
    return op.Mul(out, op.CastLike(op.Constant(value_float=scale), x))


def decomposed_grouped_moe(x, router_logits, expert_bias, fc1, fc2, k: int, n_group: int, topk_group: int,
                           scale: float):
    scores, chosen = _grouped_choice(router_logits, expert_bias, k, n_group, topk_group)
    picked = op.GatherElements(scores, chosen, axis=1)
    if k > 1:
        picked = op.Div(picked, op.Add(op.ReduceSum(picked, op.Constant(value_ints=[-1]), keepdims=1),
                                       op.Constant(value_float=1e-20)))
    weights = op.Mul(picked, op.Constant(value_float=scale))
    return _every_expert(x, _dense_weights(scores, chosen, weights), fc1, fc2)


def translation_table(form: str) -> dict:
    """``torch.onnx.export``'s ``custom_translation_table`` for the expert ops in ``form``."""
    import torch

    from ..models import moe  # noqa: F401  (registers the ops)

    _register_moe_schema()
    fused = form == "fused"
    return {torch.ops.llada_onnx.moe_swiglu.default: fused_moe if fused else decomposed_moe,
            torch.ops.llada_onnx.moe_grouped_swiglu.default: fused_grouped_moe if fused else decomposed_grouped_moe}
