"""LLaDA-MoE (LLaDAMoEModelLM): the official routing, the checkpoint layout, export with the fused and the
decomposed expert op, and the runtime token-exact with the torch sampler."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from llada_onnx.models import UnsupportedConfigError, generate, read_checkpoint_config
from llada_onnx.models.llada_moe import LLaDAMoEConfig
from llada_onnx.models.moe import interleave_gate_up, moe_swiglu
from llada_onnx.models.tiny import MOE_SPECIALS
from llada_onnx.runtime import Manifest, Pipeline

from conftest import dequantized_experts, graph_ops, prompts

PAD = MOE_SPECIALS["<|endoftext|>"]


def test_routing_is_the_official_one():
    """Softmax over all experts in float32, top-k, the raw top-k probabilities as weights (no renormalisation)."""
    gen = torch.Generator().manual_seed(0)
    x, logits = torch.randn(3, 8, generator=gen), torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0],
                                                                [1.0, 2.0, 1.5, 0.0]])
    gate, up, down = (torch.randn(4, 6, 8, generator=gen), torch.randn(4, 6, 8, generator=gen),
                      torch.randn(4, 8, 6, generator=gen))
    fc1 = torch.stack([interleave_gate_up(gate[e], up[e]) for e in range(4)])
    got = moe_swiglu(x, logits, fc1, down, 2)
    probs = F.softmax(logits, dim=-1)
    for t, experts in enumerate(([0, 1], [2, 3], [1, 2])):  # the two largest logits of each row
        want = sum(probs[t, e] * (down[e] @ (F.silu(gate[e] @ x[t]) * (up[e] @ x[t]))) for e in experts)
        torch.testing.assert_close(got[t], want, rtol=1e-5, atol=1e-5)
    assert float(probs[0, :2].sum()) < 1  # the weights are not renormalised


def test_checkpoint_layout_and_dispatch(moe_ckpt, moe_model):
    from safetensors import safe_open

    names = set()
    for file in moe_ckpt.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            names |= set(f.keys())
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_norm.weight", "model.layers.1.mlp.gate.weight",
            "model.layers.1.mlp.experts.7.down_proj.weight", "model.norm.weight", "lm_head.weight"} <= names
    assert (moe_ckpt / "model.safetensors.index.json").is_file()  # sharded
    architecture, cfg = read_checkpoint_config(moe_ckpt)
    assert architecture.name == "LLaDAMoEModelLM" and json.loads((moe_ckpt / "config.json").read_text())[
        "model_type"] == "llada"
    assert cfg.special_ids() == {"mask_token_id": 156895, "eos_token_id": 156892, "pad_token_id": 156892,
                                 "bos_token_id": 156892, "eot_token_id": MOE_SPECIALS["<|role_end|>"]}


@pytest.mark.parametrize("field,value", [("shared_expert_intermediate_size", 1024),
                                         ("moe_router_enable_expert_bias", True),
                                         ("moe_router_score_function", "sigmoid"), ("moe_layer_freq", 2),
                                         ("tie_word_embeddings", True)])
def test_unimplemented_features_are_refused_by_name(moe_ckpt, field, value):
    raw = json.loads((moe_ckpt / "config.json").read_text())
    with pytest.raises(UnsupportedConfigError, match=field):
        LLaDAMoEConfig.from_dict(dict(raw, **{field: value}))


def test_padded_keys_are_masked(moe_model):
    """Unlike the official code, a left-padded row gives the logits of its prompt alone."""
    ids = torch.tensor([[5, 6, 7, 8]])
    padded = torch.tensor([[PAD, PAD, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(moe_model(padded, mask)[:, 2:], moe_model(ids), rtol=1e-4, atol=1e-4)


def test_exports_hold_the_fused_or_the_decomposed_op(moe_fused, moe_decomposed):
    def ops(export):
        return {n.op_type for n in onnx.load(str(export / "model.onnx"), load_external_data=False).graph.node}

    assert "MoE" in ops(moe_fused) and "MoE" not in ops(moe_decomposed) and "TopK" in ops(moe_decomposed)
    for export, form in ((moe_fused, "fused"), (moe_decomposed, "decomposed")):
        raw = json.loads((export / "llada_onnx.json").read_text())
        assert raw["architecture"] == "LLaDAMoEModelLM" and raw["moe"] == form
        report = json.loads((export / "validation.json").read_text())
        assert report["logits_max_abs_diff"] < report["logits_tolerance"] and report["top_ids_agreement"] == 1.0
    assert Manifest.load(moe_fused).cache_graph == "cache.onnx"


@pytest.mark.parametrize("options", [dict(steps=8, gen_length=8, block_length=8),
                                     dict(steps=6, gen_length=12, block_length=4),
                                     dict(steps=8, gen_length=8, block_length=4, cfg_scale=1.0),
                                     dict(steps=8, gen_length=8, block_length=4, temperature=0.7),
                                     dict(steps=8, gen_length=8, block_length=4, remasking="random"),
                                     dict(steps=8, gen_length=8, block_length=4, confidence_eos_eot_inf=True)],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_runtime_is_token_exact_with_torch(moe_fused, moe_decomposed, moe_model, options):
    ids, mask = prompts(3, seed=2, pad_id=PAD)
    want = generate(moe_model, torch.from_numpy(ids), torch.from_numpy(mask), seed=4, **options).numpy()
    for export in (moe_fused, moe_decomposed):
        np.testing.assert_array_equal(Pipeline.from_pretrained(export).generate_ids(ids, mask, seed=4, **options),
                                      want)


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_qmoe_is_the_dequantized_experts(method):
    """One MoE node rewritten as QMoE computes the official routing over the dequantized expert weights."""
    from onnx import TensorProto, helper, numpy_helper

    from llada_onnx.export.quantize_experts import quantize_experts

    rng = np.random.default_rng(0)
    experts, hidden, inter, tokens, k = 4, 32, 16, 5, 2
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    logits = rng.standard_normal((tokens, experts)).astype(np.float32)
    fc1 = rng.standard_normal((experts, 2 * inter, hidden)).astype(np.float32)  # gate/up interleaved
    fc2 = rng.standard_normal((experts, hidden, inter)).astype(np.float32)
    node = helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=k,
                            activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                            normalize_routing_weights=0)
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("x", [tokens, hidden]),
                                                                               ("logits", [tokens, experts]))]
    graph = helper.make_graph([node], "g", io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(fc2, "fc2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    assert quantize_experts(model, Path("."), method, 16) == 1
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "logits": logits})[0]

    d1, d2 = (dequantized_experts(w, method, 16) for w in (fc1, fc2))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.zeros_like(x)
    for t in range(tokens):
        for e in np.argsort(-probs[t])[:k]:  # the raw probabilities mix, unnormalised
            h = d1[e] @ x[t]
            want[t] += probs[t, e] * (d2[e] @ (h[0::2] / (1 + np.exp(-h[0::2])) * h[1::2]))
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max(), rtol=0)


def test_quantized_exports(tmp_path, moe_ckpt, moe_fused, moe_decomposed):
    from llada_onnx.export import ExportError, Quantization, export
    from llada_onnx.export.quantize import quantize_export
    from llada_onnx.export.verify import verify

    int4 = tmp_path / "int4"
    export(moe_ckpt, int4, quantization=Quantization("int4"), cache=True, progress=False)
    int8 = tmp_path / "int8"
    quantize_export(moe_fused, int8, Quantization("int8"), progress=False)
    for export_dir in (int4, int8):
        ops = {n.op_type for n in onnx.load(str(export_dir / "model.onnx"), load_external_data=False).graph.node}
        assert "QMoE" in ops and "MoE" not in ops
        report = verify(moe_ckpt, export_dir)
        assert not report["exact"] and abs(report["loss"]["relative_change"]) <= report["loss"]["tolerance"]
    assert (int8 / "model.onnx.data").stat().st_size < (moe_fused / "model.onnx.data").stat().st_size
    assert Pipeline.from_pretrained(int4).generate_ids([[5, 6]], gen_length=8, cache="dual").shape == (1, 10)
    with pytest.raises(ExportError, match="--moe fused"):
        export(moe_ckpt, tmp_path / "no", moe="decomposed", quantization=Quantization("int4"), progress=False)
    with pytest.raises(ExportError, match="--moe fused"):
        quantize_export(moe_decomposed, tmp_path / "no", Quantization("int8"), progress=False)
    # experts the CUDA kernel cannot lay out (an input width that is no multiple of 64) are refused in one line
    with pytest.raises(ExportError, match="multiple of 64"):
        export(moe_ckpt, tmp_path / "no", dtype="fp16", validate=False, quantization=Quantization("int4"),
               progress=False)
    assert not (tmp_path / "no").exists()
    from llada_onnx.runtime import UnsupportedGraphError
    from llada_onnx.runtime.manifest import Manifest
    from llada_onnx.runtime.session import check_moe_kernel

    with pytest.raises(UnsupportedGraphError, match="run it with --provider cpu, or quantize an fp16 export"):
        check_moe_kernel(Manifest.load(int4), "CUDAExecutionProvider")
    check_moe_kernel(Manifest.load(moe_fused), "CUDAExecutionProvider")  # float experts run on CUDA


def test_experts_quantized_for_cuda(tmp_path):
    """An fp16 export's experts are quantized in the CUDA kernel's layout (packed by onnxruntime's own CUDA
    quantizer, here on the CPU), recorded in the manifest and refused on the CPU; tests/test_cuda.py runs them."""
    from llada_onnx.export import ExportError, Quantization, export
    from llada_onnx.export.quantize import quantize_export
    from llada_onnx.models.tiny import make_tiny_moe_checkpoint
    from llada_onnx.runtime import UnsupportedGraphError

    ckpt = make_tiny_moe_checkpoint(tmp_path / "ckpt", expert_size=64, seed=2)
    out = tmp_path / "int4"
    export(ckpt, out, dtype="fp16", validate=False, quantization=Quantization("int4"), progress=False)
    manifest = json.loads((out / "llada_onnx.json").read_text())
    assert manifest["experts_layout"] == "cuda" and manifest["variant"] == "int4-b32"
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    shapes = {t.name: (tuple(t.dims), t.data_type) for t in graph.initializer}
    qmoe = [n for n in graph.node if n.op_type == "QMoE"]
    assert len(qmoe) == 2 and all(len(n.input) == 7 for n in qmoe)  # router logits only: no router_weights
    fc1, fc1_scales = shapes[qmoe[0].input[2]], shapes[qmoe[0].input[3]]
    assert fc1 == ((8, 64, 64), onnx.TensorProto.UINT8)  # [experts, in, out / 2]: 2 x 64 gate/up rows, 64 wide
    assert fc1_scales == ((8, 128, 2), onnx.TensorProto.FLOAT16)  # [experts, out, in / 32]
    with pytest.raises(UnsupportedGraphError, match="laid out for onnxruntime's CUDA kernel"):
        Pipeline.from_pretrained(out)
    with pytest.raises(ExportError, match="blocks of 32, 64, 128"):
        export(ckpt, tmp_path / "no", dtype="fp16", validate=False, quantization=Quantization("int4", 16),
               progress=False)
    fp16 = tmp_path / "fp16"
    export(ckpt, fp16, dtype="fp16", validate=False, progress=False)
    with pytest.raises(ExportError, match="--device cuda, or --no-validate"):
        quantize_export(fp16, tmp_path / "no", Quantization("int4"), progress=False)
    assert not (tmp_path / "no").exists()


def test_kv_cache_refreshed_every_step_is_exact(moe_fused):
    pipe = Pipeline.from_pretrained(moe_fused)
    ids, mask = prompts(2, seed=5, pad_id=PAD)
    kw = dict(gen_length=16, block_length=8, steps=16)
    exact = pipe.generate_ids(ids, mask, **kw)
    np.testing.assert_array_equal(pipe.generate_ids(ids, mask, cache="dual", refresh_every=1, **kw), exact)
    fast = pipe.generate_ids(ids, mask, cache="dual", threshold=0.9, **kw)
    assert fast.shape == exact.shape and not (fast == 156895).any()


def test_fused_export_rotates_the_normalised_heads_in_one_op(tmp_path, moe_ckpt, moe_model):
    """``--fusion ort``: each layer normalises its queries and keys before rotating them, and each of the two
    rotations becomes one RotaryEmbedding in both graphs (cos/sin computed once); the export validates and the
    runtime stays token-exact with torch, with the KV cache refreshed every step too."""
    from llada_onnx.export import export

    report = export(moe_ckpt, tmp_path / "ort", fusion="ort", cache=True, progress=False).validation
    assert report["logits_max_abs_diff"] < report["logits_tolerance"] and report["top_ids_agreement"] == 1.0
    for graph in ("model.onnx", "cache.onnx"):
        ops = graph_ops(tmp_path / "ort" / graph)
        assert ops["RotaryEmbedding"] == 2 * moe_model.config.num_hidden_layers, graph
        assert ops["Cos"] == ops["Sin"] == 1 and "Neg" not in ops, graph
    pipe = Pipeline.from_pretrained(tmp_path / "ort")
    ids, mask = prompts(3, seed=2, pad_id=PAD)
    kw = dict(steps=8, gen_length=8, block_length=4)
    want = generate(moe_model, torch.from_numpy(ids), torch.from_numpy(mask), **kw).numpy()
    np.testing.assert_array_equal(pipe.generate_ids(ids, mask, **kw), want)
    np.testing.assert_array_equal(pipe.generate_ids(ids, mask, cache="dual", refresh_every=1, **kw), want)


def test_chat_with_an_instruct_layout_export(moe_fused):
    res = subprocess.run([str(Path(sys.executable).with_name("llada-onnx")), "chat", "--model", str(moe_fused),
                          "--gen-length", "8"], input="the king\nthe queen\n\n", capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("llada>") == 2


def test_an_older_cpu_moe_kernel_is_refused(moe_fused, monkeypatch):
    from llada_onnx.runtime import UnsupportedGraphError, session

    monkeypatch.setattr(session.ort, "__version__", "1.31.1")
    with pytest.raises(UnsupportedGraphError, match="onnxruntime >= 1.32 on the CPU, or an export made with --moe "
                                                    "decomposed"):
        Pipeline.from_pretrained(moe_fused)



def test_verify_passes_on_both_forms(moe_ckpt, moe_fused, moe_decomposed):
    from llada_onnx.export.verify import verify

    for export_dir in (moe_fused, moe_decomposed):
        report = verify(moe_ckpt, export_dir, prompts=["the king and the queen", "a lord"])
        assert report["exact"] and report["passed"], report["first_failure"]
