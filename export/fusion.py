"""Graph fusion for onnxruntime: attention and RMSNorm as contrib ops, via onnxscript's ORT fusion rules.

The dynamo export spells attention and RMSNorm out in standard ONNX ops (MatMul, Softmax, Pow, ReduceMean, ...):
portable to every execution provider, DirectML included, but dozens of small kernels per layer, and at batch 1
their launches cost about as much as a layer's matrix products on a GPU. ``onnxscript.rewriter.ort_fusions``
(maintained with onnxruntime for exactly these dynamo graphs) rewrites them into ``com.microsoft``
MultiHeadAttention (non-causal, the key-padding mask as an attention bias), ``SimplifiedLayerNormalization`` and
``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm), single kernels on the CPU and CUDA providers. The
rewritten graph computes the same function and passes the same validation.

The model traces RMSNorm as ``x / sqrt(mean(x^2) + eps)`` (see :class:`~llada_onnx.models.modeling.RMSNorm`), the
form onnxruntime fuses by itself when it loads an unfused graph; onnxscript's rule knows the ``x * rsqrt`` form
only, so :class:`DivRmsNormFusion` (its rule with that one pattern changed) runs first.
"""

from __future__ import annotations

from ..runtime.errors import LladaOnnxError

# Ops a fused graph must contain: without them the rules did not match and the "fused" export would be a slow copy.
REQUIRED = ("MultiHeadAttention", "SimplifiedLayerNormalization")
# The KV-cache graph's attention (past and fresh keys scored apart, see LLaDABlock) is no MultiHeadAttention
# pattern, and stays in standard ops: measured on the CPU, onnxruntime's MultiHeadAttention with a past was slower
# for a 32-token block (213 against 179 us a layer, default model). Its RMSNorms are fused.
CACHE_REQUIRED = ("SimplifiedLayerNormalization",)


def _div_rms_norm_rules():
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter.ort_fusions.rms_normalization import RmsNormFusion

    class DivRmsNormFusion(RmsNormFusion):
        """onnxscript's RMSNorm -> SimplifiedLayerNormalization rule, matching ``x / sqrt(...)``."""

        def pattern(self, op, x, scale, epsilon, compute_dtype, target_dtype):
            x = pattern.OrValue([op.Cast(x, to=compute_dtype), x])
            mean_square = op.ReduceMean(op.Pow(x, 2.0), [-1], keepdims=1, noop_with_empty_axes=0)
            normalized = op.Div(x, op.Sqrt(op.Add(mean_square, epsilon)))
            normalized = pattern.OrValue([op.Cast(normalized, to=target_dtype), normalized])
            scale = pattern.OrValue([op.Cast(scale, to=compute_dtype), scale])
            return op.Mul(normalized, scale) if self._mul_order else op.Mul(scale, normalized)

    return pattern.RewriteRuleSet([DivRmsNormFusion.rule("DivRmsNormFusion1", _mul_order=False),
                                   DivRmsNormFusion.rule("DivRmsNormFusion2", _mul_order=True)])


class FusionError(LladaOnnxError, RuntimeError):
    """The fusion rules did not match this graph (the message names what is missing)."""


def fuse_for_onnxruntime(model, required: tuple[str, ...] | None = None) -> dict[str, int]:
    """Rewrite the traced ``onnx_ir`` model in place (before it is saved: the weights stay the tensors the
    tracer holds, so a fused export writes its graph once instead of writing, re-reading and rewriting it).

    ``required`` names the fused ops the result must contain (default :data:`REQUIRED`, the main graph's).
    Returns how often each rewrite applied.
    """
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    norms = _div_rms_norm_rules().apply_to_model(model)
    fused, counts = optimize_for_ort(model)
    counts["rms_normalization"] = counts.get("rms_normalization", 0) + norms
    if fused is not model:
        raise FusionError("onnxscript's optimize_for_ort returned a new model instead of rewriting in place")
    ops = {node.op_type for node in model.graph}
    missing = [name for name in (required or REQUIRED) if not any(name in op for op in ops)]
    if missing:
        raise FusionError(f"onnxscript's onnxruntime fusions produced no {missing} for this graph; "
                          "export it with fusion 'none' instead")
    return {name: n for name, n in counts.items() if n}
