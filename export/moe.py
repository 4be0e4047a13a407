"""How LLaDA-MoE's expert op (:func:`llada_onnx.models.moe.moe_swiglu`) is written to ONNX.

* ``fused`` (the default): onnxruntime's ``com.microsoft.MoE`` kernel (CPU fp32, CUDA), which takes the router
  logits and does the softmax, the top-k and the experts itself: ``k`` experts per token, ``swiglu`` with
  alpha 1 and beta 0 (``silu(gate) * up``), gate and up rows interleaved (``swiglu_fusion=1``), and no
  renormalisation of the top-k weights (``normalize_routing_weights=0``), which is the official routing.
* ``decomposed``: standard ONNX ops only, for providers without that kernel (DirectML) at the default opset.
  Softmax and TopK give the routing, scattered into a dense ``[tokens, experts]`` weight matrix; every expert
  runs on every token as one batched MatMul and the weighted sum keeps the chosen ones. That is
  ``experts / k`` times the fused kernel's expert arithmetic (8x for the real 64-expert, top-8 model): a
  portable fallback, not the fast path.
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
    weights = op.ScatterElements(op.Mul(probs, op.Constant(value_float=0.0)), chosen, top, axis=1)
    weights = op.CastLike(weights, x)
    h = op.MatMul(op.Unsqueeze(x, op.Constant(value_ints=[0])), op.Transpose(fc1, perm=[0, 2, 1]))  # [E, T, 2I]
    two_i, last, every_other = op.Shape(fc1, start=1, end=2), op.Constant(value_ints=[-1]), op.Constant(value_ints=[2])
    gate = op.Slice(h, op.Constant(value_ints=[0]), two_i, last, every_other)  # the interleaved rows 0, 2, ...
    up = op.Slice(h, op.Constant(value_ints=[1]), two_i, last, every_other)  # and 1, 3, ...
    act = op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)
    out = op.MatMul(act, op.Transpose(fc2, perm=[0, 2, 1]))  # [E, T, H]
    mix = op.Unsqueeze(op.Transpose(weights, perm=[1, 0]), op.Constant(value_ints=[2]))  # [E, T, 1]
    return op.ReduceSum(op.Mul(out, mix), op.Constant(value_ints=[0]), keepdims=0)


def translation_table(form: str) -> dict:
    """``torch.onnx.export``'s ``custom_translation_table`` for the MoE op in ``form``."""
    import torch

    from ..models import moe  # noqa: F401  (registers the op)

    _register_moe_schema()
    return {torch.ops.llada_onnx.moe_swiglu.default: {"fused": fused_moe, "decomposed": decomposed_moe}[form]}
