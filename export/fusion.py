"""Graph fusion for onnxruntime: attention and RMSNorm as contrib ops, via onnxscript's ORT fusion rules.

The dynamo export spells attention and RMSNorm out in standard ONNX ops (MatMul, Softmax, Pow, ReduceMean, ...):
portable to every execution provider, DirectML included, but dozens of small kernels per layer, and at batch 1
their launches cost about as much as a layer's matrix products on a GPU. ``onnxscript.rewriter.ort_fusions``
(maintained with onnxruntime for exactly these dynamo graphs) rewrites them into ``com.microsoft``
MultiHeadAttention (non-causal, the key-padding mask as an attention bias), ``SimplifiedLayerNormalization`` and
``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm), single kernels on the CPU and CUDA providers. The
rewritten graph computes the same function and passes the same validation.

Rewrites of this project's own follow. :func:`rotate_in_attention`: the traced attention takes the joined
q/k/v projection apart into four-dimensional views, rotates queries and keys in float32 with separate
multiplies, and moves heads forward and back again before ``MultiHeadAttention``, which takes ``[batch,
sequence, heads * head_dim]`` tensors anyway. It becomes one ``Split`` of the projection and two ``com.microsoft``
``RotaryEmbedding`` kernels feeding the attention directly, with one attention bias for every layer.
:func:`rotate_heads` turns every other traced rotation into one ``RotaryEmbedding`` (the KV-cache graph's query
and key heads together at their own canvas positions, the queries and keys that LLaDA-MoE and LLaDA2 normalise
before rotating, LLaDA2's partial rotation), with the cos/sin tables once for every layer.
:func:`attend_cached_in_one_op` (CUDA exports) turns the KV-cache graph's attention into one
``MultiHeadAttention`` with a past.

The model traces RMSNorm as ``x / sqrt(mean(x^2) + eps)`` (see :class:`~llada_onnx.models.modeling.RMSNorm`), the
form onnxruntime fuses by itself when it loads an unfused graph; onnxscript's rule knows the ``x * rsqrt`` form
only, so :class:`DivRmsNormFusion` (its rule with that one pattern changed) runs first.
"""

from __future__ import annotations

import numpy as np

from ..runtime.errors import LladaOnnxError

# Ops a fused graph must contain: without them the rules did not match and the "fused" export would be a slow copy.
REQUIRED = ("MultiHeadAttention", "SimplifiedLayerNormalization")
# The KV-cache graph's attention (past and fresh keys scored apart, see LLaDABlock) is no MultiHeadAttention
# pattern: for a CUDA export it becomes one (attend_cached_in_one_op); for the CPU it stays in standard ops, since
# onnxruntime's CPU MultiHeadAttention with a past is slower for a 32-token block (default model, canvas 384, 2
# threads: dual step 3.62 against 2.98 ms, medians of five runs). Its RMSNorms are fused.
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


def fuse_for_onnxruntime(model, required: tuple[str, ...] | None = None, device: str = "cpu") -> dict[str, int]:
    """Rewrite the traced ``onnx_ir`` model in place (before it is saved: the weights stay the tensors the
    tracer holds, so a fused export writes its graph once instead of writing, re-reading and rewriting it).

    ``required`` names the fused ops the result must contain (default :data:`REQUIRED`, the main graph's);
    ``device`` the export's target (``cuda`` adds the rewrites that pay on that provider only). Returns how often
    each rewrite applied.
    """
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    norms = _div_rms_norm_rules().apply_to_model(model)
    fused, counts = optimize_for_ort(model)
    counts["rms_normalization"] = counts.get("rms_normalization", 0) + norms
    if fused is not model:
        raise FusionError("onnxscript's optimize_for_ort returned a new model instead of rewriting in place")
    counts["rotary_attention"] = rotate_in_attention(model)
    counts["rotary"] = rotate_heads(model)
    if device == "cuda":
        counts["cached_attention"] = attend_cached_in_one_op(model)
    ops = {node.op_type for node in model.graph}
    missing = [name for name in (required or REQUIRED) if not any(name in op for op in ops)]
    if missing:
        raise FusionError(f"onnxscript's onnxruntime fusions produced no {missing} for this graph; "
                          "export it with fusion 'none' instead")
    return {name: n for name, n in counts.items() if n}


def made_by(value, op_type):
    """The node of type ``op_type`` that produced ``value``, or None."""
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type else None


def used_by(value, op_type):
    """The one node that uses ``value``, if it is of type ``op_type``; else None."""
    users = value.consumers()
    return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def int64s(build, values):
    """An int64 ``Constant`` of ``values`` (shapes, axes, slice bounds) on the tape ``build``."""
    import onnx_ir as ir

    return build.op("Constant", [], {"value": ir.tensor(np.array(values, dtype=np.int64))})


def split_sizes(split):
    """The constant sizes a ``Split`` node cuts its input into, or None."""
    sizes = split.inputs[1] if len(split.inputs) > 1 else None
    return sizes.const_value if sizes is not None else None


def cast_to(build, value, dtype):
    """``value`` cast to ``dtype`` on the tape ``build`` (itself when it is float32 already)."""
    import onnx_ir as ir

    return value if dtype == ir.DataType.FLOAT else build.op("Cast", [value], {"to": dtype})


def through_cast(value):
    """``value`` before the Cast that produced it, if one did."""
    cast = made_by(value, "Cast")
    return cast.inputs[0] if cast is not None else value


def rotate_in_attention(model) -> int:
    """Rewrite each ``MultiHeadAttention`` fed by the traced rotary attention (see the module docstring) in place;
    returns how many. Attention traced in another form (a query/key norm before the rotation, grouped-query key
    heads, positions per row) is left as it is.

    Traced (per layer): ``view = Reshape(MatMul(x, W_qkv))`` ``[B, S, Hq + 2 Hkv, D]``; queries and keys are
    ``Slice(view)``, rotated as ``t * cos + Concat(t[D/2:], t[:D/2]) * signed_sin`` (casts around it in half
    precision), transposed, split into ``Hq`` and ``Hkv`` heads, transposed back and reshaped for the attention;
    values are ``Reshape(Slice(view))``. ``cos`` is ``Cos(Concat(angles, angles))`` of the ``[S, D/2]`` angle table.
    Rewritten: ``Split(MatMul(x, W_qkv))`` into q, k, v; ``RotaryEmbedding(q or k, 0, cos(angles), sin(angles))``.
    ``RotaryEmbedding`` computes ``x1 cos - x2 sin, x2 cos + x1 sin``: the same products as the traced form.
    """
    from onnx_ir import tape
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    graph, tables, shared_bias, rewritten = model.graph, {}, None, 0
    for mha in [n for n in graph if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"]:
        q_in, k_in, v_in = mha.inputs[:3]
        q_t = made_by(q_in, "Reshape") and made_by(made_by(q_in, "Reshape").inputs[0], "Transpose")
        k_t = made_by(k_in, "Reshape") and made_by(made_by(k_in, "Reshape").inputs[0], "Transpose")
        v_slice = made_by(v_in, "Reshape") and made_by(made_by(v_in, "Reshape").inputs[0], "Slice")
        split = q_t and k_t and made_by(q_t.inputs[0], "Split")
        if not (v_slice and split and made_by(k_t.inputs[0], "Split") is split and len(split.outputs) == 2):
            continue
        view = made_by(v_slice.inputs[0], "Reshape")
        transpose = made_by(split.inputs[0], "Transpose")
        rotated = transpose and made_by(through_cast(transpose.inputs[0]), "Add")
        found = rotated and _traced_rotation(rotated)
        if not (view and made_by(view.inputs[0], "MatMul") and found):
            continue
        heads, angles = made_by(found[0], "Slice"), found[1]
        if heads is None or heads.inputs[0] is not view.outputs[0]:
            continue  # the rotation is not of this projection's query and key heads
        sizes = split_sizes(split)
        qkv, dtype = view.inputs[0], q_in.dtype
        if sizes is None or angles.shape is None or angles.shape.rank() != 2:
            continue
        q_heads, kv_heads = (int(n) for n in sizes.numpy())
        width = qkv.shape[-1] if qkv.shape is not None else None
        if not isinstance(width, int) or width % (q_heads + 2 * kv_heads):
            continue
        head_dim = width // (q_heads + 2 * kv_heads)
        build = tape.Tape()
        if angles not in tables:  # cos and sin of the [S, D/2] angles, once for every layer
            tables[angles] = _rotary_tables(build, angles, dtype)
        first_position, cos_cache, sin_cache = tables[angles]
        widths = int64s(build, [q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
        q, k, v = build.op_multi_out("Split", [qkv, widths], {"axis": -1}, num_outputs=3)
        q, k = (build.op("RotaryEmbedding", [t, first_position, cos_cache, sin_cache],
                         {"num_heads": heads, "interleaved": 0}, domain="com.microsoft")
                for t, heads in ((q, q_heads), (k, kv_heads)))
        graph.insert_before(mha, build.nodes)
        for index, value in enumerate((q, k, v)):
            mha.replace_input_with(index, value)
        if len(mha.inputs) > 5 and mha.inputs[5] is not None:
            if shared_bias is None:  # [B, 1, S, L]: S read from the queries, not from the traced heads
                shared_bias = _bias_sized_by(mha.inputs[5], split.outputs[0], q, graph, mha)
            if shared_bias is not None:
                mha.replace_input_with(5, shared_bias)
        rewritten += 1
    if rewritten:
        RemoveUnusedNodesPass()(model)
    return rewritten


def _traced_rotation(add):
    """``(heads, angles)`` when ``add`` is the traced ``heads * cos + Concat(halves) * signed_sin`` (see
    :func:`rotate_in_attention`): ``heads`` the tensor rotated (before a cast to float32), ``angles`` the table the
    cos is taken of; None otherwise."""
    muls = [made_by(v, "Mul") for v in add.inputs]
    if len(muls) != 2 or not all(muls):
        return None
    heads = angles = None
    for mul in muls:
        for operand in mul.inputs:
            unsqueeze = made_by(through_cast(operand), "Unsqueeze")
            cos = unsqueeze and made_by(unsqueeze.inputs[0], "Cos")
            cat = cos and made_by(cos.inputs[0], "Concat")
            if cat and len(cat.inputs) == 2 and cat.inputs[0] is cat.inputs[1]:
                angles = cat.inputs[0]
                others = [v for v in mul.inputs if v is not operand]
                heads = through_cast(others[0]) if others else None
    return (heads, angles) if heads is not None and angles is not None else None


def rotate_heads(model) -> int:
    """Rewrite each traced rotation that :func:`rotate_in_attention` left in place into one
    ``com.microsoft.RotaryEmbedding``; returns how many.

    Traced (per layer): heads ``t`` ``[B, n, H, D]`` (the projection's leading query and key heads together, or
    the queries and the keys each after their own RMSNorm) rotated as in :func:`rotate_in_attention` at angles
    ``A`` (``[n, D/2]``, or ``[B, n, D/2]`` at each token's own position), in float32 with casts around it or in
    the heads' own precision; a partial rotation (the first ``r`` of ``D``) rotates ``t[..., :r]`` and joins
    ``t[..., r:]`` after it. Rewritten: ``Reshape(RotaryEmbedding(Reshape(t, [0, 0, H D]), rows, cos(A), sin(A),
    rotary_embedding_dim=r), [0, 0, H, D])``, the cos and sin once for every layer (see :func:`_rotary_tables`).
    The rotated values are the same products at the same angles; the transposes and splits after them stay.
    """
    import onnx_ir as ir
    from onnx_ir import tape
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    graph, tables, rewritten = model.graph, {}, 0
    for add in [n for n in graph if n.op_type == "Add"]:
        found = _traced_rotation(add)
        if found is None:
            continue
        heads, angles = found
        cast = used_by(add.outputs[0], "Cast")
        rotated = cast.outputs[0] if cast is not None else add.outputs[0]
        heads, rotated = _partial_rotation(heads, rotated) or (heads, rotated)
        shape, half = heads.shape, angles.shape[-1] if angles.shape is not None else None
        if not (isinstance(half, int) and angles.shape.rank() in (2, 3) and shape is not None and shape.rank() == 4
                and all(isinstance(d, int) for d in shape[2:]) and 2 * half <= shape[3]
                and rotated.dtype == heads.dtype and not rotated.is_graph_output()):
            continue
        n_heads, head_dim = shape[2], shape[3]
        build = tape.Tape()
        if angles not in tables:
            tables[angles] = _rotary_tables(build, angles, heads.dtype)
        rows, cos_cache, sin_cache = tables[angles]
        flat = build.op("Reshape", [heads, int64s(build, [0, 0, n_heads * head_dim])])
        partial = {"rotary_embedding_dim": 2 * half} if 2 * half != head_dim else {}
        turned = build.op("RotaryEmbedding", [flat, rows, cos_cache, sin_cache],
                          {"num_heads": n_heads, "interleaved": 0, **partial}, domain="com.microsoft")
        turned = build.op("Reshape", [turned, int64s(build, [0, 0, n_heads, head_dim])])
        graph.insert_after(rotated.producer(), build.nodes)
        ir.convenience.replace_all_uses_with(rotated, turned)
        rewritten += 1
    if rewritten:
        RemoveUnusedNodesPass()(model)
    return rewritten


def _partial_rotation(part, rotated):
    """``(heads, joined)`` when ``part`` is ``heads[..., :r]`` and ``rotated`` (its rotation) is joined to
    ``heads[..., r:]`` along the last axis (LLaDA2's partial rotary); None otherwise."""
    first, join = made_by(part, "Slice"), used_by(rotated, "Concat")
    if not (first and join and len(join.inputs) == 2 and join.inputs[0] is rotated):
        return None
    rest, heads = made_by(join.inputs[1], "Slice"), first.inputs[0]
    last = heads.shape.rank() - 1 if heads.shape is not None else None
    bounds = [_slice_bounds(first), _slice_bounds(rest) if rest and rest.inputs[0] is heads else None]
    if last is None or None in bounds or join.attributes.get_int("axis") not in (-1, last):
        return None
    (start, end, axis), (rest_start, _, rest_axis) = bounds
    if start != 0 or rest_start != end or {axis, rest_axis} - {-1, last}:
        return None
    return heads, join.outputs[0]


def _slice_bounds(node):
    """``(start, end, axis)`` of a one-axis, unit-step constant ``Slice``; None for any other."""
    consts = [v.const_value if v is not None else None for v in node.inputs[1:]]
    if len(consts) < 3 or None in consts[:3] or any(c.size != 1 for c in consts[:3]):
        return None
    if len(consts) > 3 and (consts[3] is None or int(consts[3].numpy().ravel()[0]) != 1):
        return None
    return tuple(int(c.numpy().ravel()[0]) for c in consts[:3])


def _rotary_tables(build, angles, dtype):
    """``(rows, cos, sin)`` for ``RotaryEmbedding`` of the traced ``angles``: for ``[n, D/2]`` angles the table
    itself and position 0 (token ``i`` takes row ``i``); for ``[B, n, D/2]`` (each token at its own position) the
    angles flattened to ``[B n, D/2]`` and the row numbers ``[B, n]`` (token ``(b, i)`` takes row ``b n + i``)."""
    if angles.shape.rank() == 2:
        table, rows = angles, int64s(build, [0])
    else:
        table = build.op("Reshape", [angles, int64s(build, [-1, angles.shape[-1]])])
        count = build.op("Squeeze", [build.op("Shape", [table], {"start": 0, "end": 1})])
        rows = build.op("Range", [int64s(build, 0), count, int64s(build, 1)])
        rows = build.op("Reshape", [rows, build.op("Shape", [angles], {"start": 0, "end": 2})])
    return rows, cast_to(build, build.op("Cos", [table]), dtype), cast_to(build, build.op("Sin", [table]), dtype)


def attend_cached_in_one_op(model) -> int:
    """Rewrite each KV-cache graph attention over ``past + fresh`` keys (``models.modeling._attend_with_past``:
    scores against the past and the fresh keys, joined rows, bias, softmax, two value products and their sum)
    whose queries have their own key head into one ``com.microsoft.MultiHeadAttention`` with ``past_key`` /
    ``past_value``, fed the rotated ``[B, n, H D]`` queries and keys of :func:`rotate_heads`; returns how
    many. The fresh keys the graph returns become a transpose of the op's key input alone (traced, they are cut
    from a transpose of the queries and keys together); the fresh values stay as traced. Grouped-query attention
    (fewer key heads) is left as it is.
    """
    import onnx_ir as ir
    from onnx_ir import tape
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    graph, shared_bias, rewritten = model.graph, {}, 0
    for softmax in [n for n in graph if n.op_type == "Softmax"]:
        scores = made_by(softmax.inputs[0], "Add")
        joined = scores and made_by(scores.inputs[0], "Concat")
        bias = scores and made_by(scores.inputs[1], "Unsqueeze")
        products = joined and [made_by(v, "FusedMatMul") or made_by(v, "MatMul") for v in joined.inputs]
        if not (bias and products and len(products) == 2 and all(products)):
            continue
        past_k, fresh_k = (made_by(m.inputs[1], "Unsqueeze") for m in products)
        grouped = made_by(products[0].inputs[0], "Reshape")
        scaled = grouped and made_by(grouped.inputs[0], "Mul")
        split = scaled and made_by(scaled.inputs[0], "Split")
        heads = split and made_by(split.inputs[0], "Transpose")
        rotated = heads and made_by(heads.inputs[0], "Reshape")
        turned = rotated and made_by(rotated.inputs[0], "RotaryEmbedding")
        if not (past_k and fresh_k and turned and fresh_k.inputs[0] is split.outputs[1]):
            continue
        weighted = [used_by(c.outputs[0], "MatMul") if c.op_type == "Slice" else None
                    for c in softmax.outputs[0].consumers()]
        total = len(weighted) == 2 and all(weighted) and used_by(weighted[0].outputs[0], "Add")
        if not total:
            continue
        past_v, fresh_v = (made_by(w.inputs[1], "Unsqueeze") for w in weighted)
        merged = used_by(total.outputs[0], "Reshape")
        back = merged and used_by(merged.outputs[0], "Transpose")
        flat = back and used_by(back.outputs[0], "Reshape")
        value_heads = fresh_v and made_by(fresh_v.inputs[0], "Transpose")
        values = value_heads and made_by(value_heads.inputs[0], "Slice")  # [B, n, H, D], the fresh values' copy
        sizes, scale = split_sizes(split), scaled.inputs[1].const_value
        if not (past_v and flat and values and sizes is not None and scale is not None and scale.size == 1):
            continue
        n_heads, kv_heads = (int(h) for h in sizes.numpy())
        if n_heads != kv_heads:
            continue
        build = tape.Tape()
        q, k = build.op_multi_out("Split", [turned.outputs[0]], {"axis": -1, "num_outputs": 2}, num_outputs=2)
        v = build.op("Reshape", [values.outputs[0], int64s(build, [0, 0, -1])])
        key_bias = bias.inputs[0]
        if key_bias not in shared_bias:  # [B, 1, 1 or n, P + n] -> [B, 1, n, P + n], once for every layer
            rows = build.op("Shape", [q], {"start": 1, "end": 2})
            shared_bias[key_bias] = build.op("Expand", [key_bias, build.op(
                "Concat", [int64s(build, [1, 1]), rows, int64s(build, [1])], {"axis": 0})])
        out, _, _ = build.op_multi_out(
            "MultiHeadAttention", [q, k, v, None, None, shared_bias[key_bias], past_k.inputs[0], past_v.inputs[0]],
            {"num_heads": n_heads, "scale": float(scale.numpy().ravel()[0])}, domain="com.microsoft",
            num_outputs=3)
        fresh_keys = split.outputs[1]
        returned = fresh_keys.is_graph_output()
        if returned:  # [B, H, n, D]: the graph output keeps its name
            name, fresh_keys.name = fresh_keys.name, f"{fresh_keys.name}_traced"
            keys = build.op("Transpose", [build.op("Reshape", [k, int64s(build, [0, 0, kv_heads, -1])])],
                            {"perm": [0, 2, 1, 3]})
            keys.name = name
        graph.insert_after(flat, build.nodes)
        ir.convenience.replace_all_uses_with(flat.outputs[0], out)
        if returned:
            ir.convenience.replace_all_uses_with(fresh_keys, keys, replace_graph_outputs=True)
        rewritten += 1
    if rewritten:
        RemoveUnusedNodesPass()(model)
    return rewritten


def _bias_sized_by(bias, heads_first, queries, graph, before):
    """The traced attention bias ``Expand(mask_bias, [1, 1, S, 1])`` with ``S`` read from ``queries`` ``[B, S, .]``
    instead of the traced ``[B, H, S, D]`` heads (which the rewrite removes); None if the bias is another form."""
    from onnx_ir import tape

    expand = bias.producer()
    shape = expand.inputs[1].producer() if expand is not None and expand.op_type == "Expand" else None
    if shape is None or shape.op_type != "Concat":
        return None
    build = tape.Tape()
    length = build.op("Shape", [queries], {"start": 1, "end": 2})
    parts = [length if p.producer() is not None and p.producer().op_type == "Shape"
             and p.producer().inputs[0] is heads_first else p for p in shape.inputs]
    if all(p is not length for p in parts):
        return None
    sized = build.op("Expand", [expand.inputs[0], build.op("Concat", parts, {"axis": 0})])
    graph.insert_before(before, build.nodes)
    return sized
