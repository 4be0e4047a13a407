"""Fast decoding: Fast-dLLM's threshold and factor rules, and early stop (runtime only)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from llada_onnx.runtime import Pipeline, SamplerSettings
from llada_onnx.runtime.policies import factor_count, threshold_count

from conftest import graph_ops, prompts


def test_threshold_rule_on_hand_made_confidences():
    c = np.array([0.97, 0.92, 0.9, 0.5])
    assert threshold_count(c, 0.9) == 3  # >= tau
    assert threshold_count(c, 0.95) == 1
    assert threshold_count(c, 0.99) == 1  # nothing passes: still the most confident one
    assert threshold_count(np.array([]), 0.9) == 0  # a row whose block is already full


def test_factor_rule_on_hand_made_confidences():
    c = np.array([0.99, 0.9, 0.8, 0.3])  # (n+1)(1-c_n): 0.02, 0.3, 0.8, 3.5
    assert factor_count(c, 1.0) == 3
    assert factor_count(c, 0.5) == 2
    assert factor_count(c, 0.25) == 1
    assert factor_count(np.array([0.1]), 0.01) == 1  # at least one
    assert factor_count(np.array([]), 1.0) == 0


def count_steps(pipe, ids, mask, **kw):
    steps = []
    out = pipe.generate_ids(ids, mask, callback=lambda info: steps.append(info.total_steps), **kw)
    return out, steps


def test_rules_that_admit_one_token_reproduce_exact_decoding(pipeline):
    ids, mask = prompts(3, seed=5)
    kw = dict(gen_length=16, block_length=8, steps=16)  # one token per step: the schedules coincide
    exact = pipeline.generate_ids(ids, mask, **kw)
    for rule in ({"threshold": 1.0}, {"factor": 1e-9}):
        out, steps = count_steps(pipeline, ids, mask, **rule, **kw)
        np.testing.assert_array_equal(out, exact)
        assert len(steps) == 16 and steps[0] is None


def test_lower_thresholds_take_fewer_steps_and_fill_every_block():
    pipe = Pipeline.from_pretrained()
    ids, mask = pipe.codec.encode_batch(["ROMEO.\n", "KING.\n"], chat=False)
    mask_id = pipe.manifest.id("mask_token_id")
    calls = []
    for tau in (1.0, 0.9, 0.7, 0.5):
        out, steps = count_steps(pipe, ids, mask, gen_length=64, block_length=32, steps=64, threshold=tau)
        assert not (out == mask_id).any()
        calls.append(len(steps))
    assert calls[0] == 64 and calls == sorted(calls, reverse=True) and calls[-1] < calls[0]
    out, steps = count_steps(pipe, ids, mask, gen_length=64, block_length=32, steps=64, factor=1.0)
    assert not (out == mask_id).any() and len(steps) < 64


def test_early_stop_keeps_the_text(pipeline):
    stopped_somewhere = False
    for seed in range(4):
        ids, mask = prompts(2, seed=seed)
        kw = dict(gen_length=32, block_length=4, steps=32)
        full, full_steps = count_steps(pipeline, ids, mask, **kw)
        early, early_steps = count_steps(pipeline, ids, mask, early_stop=True, **kw)
        assert pipeline.codec.decode_batch(early[:, ids.shape[1]:]) == pipeline.codec.decode_batch(full[:, ids.shape[1]:])
        if len(early_steps) < len(full_steps):
            stopped_somewhere = True
            done = len(early_steps) // 4 * 4 + ids.shape[1]  # steps per block = 4
            assert (early[:, done:] == pipeline.manifest.id("pad_token_id")).all()
    assert stopped_somewhere  # the test model does emit EOS/EoT early
    texts = pipeline.generate(["the king", "a queen"], chat=False, gen_length=32, block_length=4, steps=32)
    assert texts == pipeline.generate(["the king", "a queen"], chat=False, gen_length=32, block_length=4, steps=32,
                                      early_stop=False)


@pytest.mark.parametrize("kw,needle", [
    (dict(threshold=0.9, factor=1.0), "either threshold or factor"),
    (dict(threshold=1.5), "threshold must be in"),
    (dict(threshold=0.0), "threshold must be in"),
    (dict(factor=-1.0), "factor must be > 0"),
    (dict(threshold=0.9, remasking="random"), "low_confidence"),
])
def test_bad_fast_settings(kw, needle):
    with pytest.raises(ValueError, match=needle):
        SamplerSettings(**kw)


def test_cli_threshold_runs_fewer_steps():
    res = subprocess.run([sys.executable, "-m", "llada_onnx.cli", "generate", "--prompt", "ROMEO.", "--json",
                          "--gen-length", "64", "--block-length", "32", "--threshold", "0.7"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["settings"]["threshold"] == 0.7 and data["timings"]["steps"] < 64


# ---------------------------------------------------------------------------------------------- KV cache
@pytest.fixture(scope="module")
def cache_pipe(tiny_cache_onnx):
    return Pipeline.from_pretrained(tiny_cache_onnx)


def test_cache_graph_shares_the_weights_and_passed_validation(tiny_cache_onnx):
    from llada_onnx.runtime import Manifest

    assert Manifest.load(tiny_cache_onnx).cache_graph == "cache.onnx"
    assert sorted(p.name for p in tiny_cache_onnx.glob("*.data")) == ["model.onnx.data"]  # no second copy
    report = json.loads((tiny_cache_onnx / "validation.json").read_text())["cache_graph"]
    assert report["step_max_abs_diff"] <= report["tolerance"] and report["refresh_max_abs_diff"] <= report["tolerance"]


def test_cached_step_right_after_a_refresh_matches_the_full_forward(cache_pipe):
    ids, mask = prompts(3, seed=2)
    canvas = np.concatenate([ids, np.full((3, 8), 126336)], axis=1)
    am = np.concatenate([mask, np.ones((3, 8), dtype=np.int64)], axis=1)
    window = np.broadcast_to(np.arange(canvas.shape[1] - 8, canvas.shape[1]), (3, 8)).copy()
    full = cache_pipe.graph.run(canvas, am, window, logits=True)
    refreshed, kv = cache_pipe.kv_cache.refresh(canvas, am, window, logits=True)
    length = canvas.shape[1]
    for fed_start in (length - 8, length - 12):  # dual (the block) and a longer fed span
        step = cache_pipe.kv_cache.step(canvas, am, fed_start, length, window, kv, logits=True)
        for out in (refreshed, step):
            assert np.abs(out.logits - full.logits).max() < 1e-4 * full.logits.std()
            np.testing.assert_array_equal(out.top_ids, full.top_ids)


def assert_cache_graph_exact(export_dir, provider: str = "cpu", agreement: float = 1.0):
    """The export's cache graph validated within tolerance, and its cached decoding (dual and prefix), refreshed
    every step, equal to its exact decoding on at least ``agreement`` of the generated positions (all of them by
    default: token-exact)."""
    report = json.loads((export_dir / "validation.json").read_text())["cache_graph"]
    print(f"{export_dir.name} cache graph validation:", json.dumps(report))
    assert max(report["step_max_abs_diff"], report["refresh_max_abs_diff"]) <= report["tolerance"]
    pipe = Pipeline.from_pretrained(export_dir, provider=provider)
    ids, mask = prompts(3, seed=5)
    kw = dict(gen_length=16, block_length=8, steps=16)
    exact = pipe.generate_ids(ids, mask, **kw)
    for mode in ("dual", "prefix"):
        cached = pipe.generate_ids(ids, mask, cache=mode, refresh_every=1, **kw)
        np.testing.assert_array_equal(cached[:, :ids.shape[1]], exact[:, :ids.shape[1]])
        share = float((cached[:, ids.shape[1]:] == exact[:, ids.shape[1]:]).mean())
        print(f"{export_dir.name} {mode} cache vs exact: {share:.3f}")
        assert share >= agreement


def test_fused_gqa_cache_graph(gqa_fused_onnx):
    """Grouped-query attention (query heads folded onto their key head) and the ORT-fused cache graph."""
    ops = graph_ops(gqa_fused_onnx / "cache.onnx")
    assert ops["SkipSimplifiedLayerNormalization"] >= 2 and "ReduceMean" not in ops
    # one rotation per layer over the queries and keys together, one cos/sin of the fed rows for all layers
    assert ops["RotaryEmbedding"] == 2 and ops["Cos"] == ops["Sin"] == 1 and "Neg" not in ops
    assert graph_ops(gqa_fused_onnx / "model.onnx")["RotaryEmbedding"] == 2  # the full forward's likewise
    assert_cache_graph_exact(gqa_fused_onnx)


def test_cuda_form_of_the_cache_attention_on_the_cpu(tmp_path, tiny_ckpt, monkeypatch):
    """A CUDA export's cache graph attends over the past in one MultiHeadAttention (attend_cached_in_one_op); the
    rewrite is forced here on a CPU export (CI has no GPU), which must validate and keep the cached sampler,
    refreshed every step, token-exact with the exact one."""
    from llada_onnx.export import export, exporter, fusion

    monkeypatch.setattr(exporter, "fuse_for_onnxruntime",
                        lambda model, required, device: fusion.fuse_for_onnxruntime(model, required, "cuda"))
    out = tmp_path / "cuda-form"
    export(tiny_ckpt, out, fusion="ort", cache=True, progress=False)
    ops = graph_ops(out / "cache.onnx")
    assert ops["MultiHeadAttention"] == ops["RotaryEmbedding"] == 2 and ops["Softmax"] == 1  # the head's
    assert ops["Transpose"] == 4  # a layer's fresh keys and its fresh values, each alone
    assert_cache_graph_exact(out)


def test_cache_refreshed_every_step_equals_uncached(cache_pipe):
    ids, mask = prompts(3, seed=4)
    kw = dict(gen_length=16, block_length=8, steps=16)
    exact = cache_pipe.generate_ids(ids, mask, **kw)
    for mode in ("dual", "prefix"):
        np.testing.assert_array_equal(cache_pipe.generate_ids(ids, mask, cache=mode, refresh_every=1, **kw), exact)


def test_cached_decoding_fills_every_block(cache_pipe):
    ids, mask = prompts(2, seed=6)
    for mode in ("dual", "prefix"):
        for extra in ({}, {"threshold": 0.5}, {"cfg_scale": 1.0}):
            out = cache_pipe.generate_ids(ids, mask, gen_length=16, block_length=8, steps=16, cache=mode, **extra)
            assert out.shape == (2, ids.shape[1] + 16) and not (out == 126336).any()


def test_cache_errors(pipeline):
    ids, mask = prompts(1)
    with pytest.raises(ValueError, match="--cache"):
        pipeline.generate_ids(ids, mask, gen_length=8, block_length=8, steps=8, cache="dual")
    with pytest.raises(ValueError, match="unknown cache"):
        SamplerSettings(cache="full")
    with pytest.raises(ValueError, match="refresh_every needs"):
        SamplerSettings(refresh_every=4)
    with pytest.raises(ValueError, match="refresh_every must be"):
        SamplerSettings(cache="dual", refresh_every=0)


def test_a_stacked_cache_graph_of_an_older_export_is_refused(tiny_cache_onnx, tmp_path):
    import shutil

    import onnx
    from onnx import TensorProto, helper

    from llada_onnx.runtime import Manifest
    from llada_onnx.runtime.kv_cache import KVCacheSession
    from llada_onnx.runtime.manifest import NotAnExportError

    old = tmp_path / "old"
    shutil.copytree(tiny_cache_onnx, old)
    names = ["input_ids", "attention_mask", "positions", "head_index", "past_keys", "past_values"]
    graph = helper.make_graph([helper.make_node("Identity", ["past_keys"], ["present_keys"])], "old",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
                              [helper.make_tensor_value_info("present_keys", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9),
              str(old / "cache.onnx"))
    with pytest.raises(NotAnExportError, match="not those of a kv_cache graph.*re-export"):
        KVCacheSession(Manifest.load(old))
