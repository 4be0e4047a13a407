"""CUDA execution provider: fp32 on CUDA token-exact with the CPU, and fp16 export figures.

These need onnxruntime-gpu and an NVIDIA GPU, so they run on the lent GPU machine (see README, "Execution
providers") and are skipped elsewhere; CI has no GPU.
"""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from llada_onnx.runtime import Pipeline

from conftest import graph_ops, prompts
from test_fast_decoding import assert_cache_graph_exact
from test_runtime import GRID, OPTIONS

pytestmark = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available(),
    reason="needs onnxruntime-gpu and a CUDA device (run on the GPU machine)")


@pytest.fixture(scope="module")
def cuda_pipe(tiny_onnx):
    return Pipeline.from_pretrained(tiny_onnx, provider="cuda")


def test_cuda_is_really_used(cuda_pipe):
    assert cuda_pipe.provider == "CUDAExecutionProvider"


@pytest.mark.parametrize("batch,gen,block,steps", GRID)
def test_cuda_fp32_token_exact_with_cpu_grid(cuda_pipe, pipeline, batch, gen, block, steps):
    ids, mask = prompts(batch, seed=gen + steps)
    kw = dict(steps=steps, gen_length=gen, block_length=block)
    np.testing.assert_array_equal(cuda_pipe.generate_ids(ids, mask, **kw), pipeline.generate_ids(ids, mask, **kw))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_cuda_fp32_token_exact_with_cpu_options(cuda_pipe, pipeline, options):
    ids, mask = prompts(3, seed=7)
    kw = dict(steps=8, gen_length=8, block_length=4, seed=3, **options)
    np.testing.assert_array_equal(cuda_pipe.generate_ids(ids, mask, **kw), pipeline.generate_ids(ids, mask, **kw))


def test_fp16_export_on_cuda(tmp_path_factory, tiny_ckpt, pipeline):
    from llada_onnx.export import export

    out = tmp_path_factory.mktemp("fp16") / "tiny-fp16"
    result = export(tiny_ckpt, out, dtype="fp16", device="cuda", progress=False)
    report = result.validation
    print("fp16 validation:", json.dumps(report))
    assert report["finite"] and report["top_ids_decisive_agreement"] >= 0.99
    assert report["top_ids_agreement"] >= 0.95 and report["top_ids_decisive_positions"] >= 0.8 * report["positions_compared"]
    fp16 = Pipeline.from_pretrained(out, provider="cuda")
    ids, mask = prompts(3, seed=7)
    kw = dict(steps=16, gen_length=16, block_length=8)
    a, b = fp16.generate_ids(ids, mask, **kw), pipeline.generate_ids(ids, mask, **kw)
    agreement = float((a[:, ids.shape[1]:] == b[:, ids.shape[1]:]).mean())
    print(f"fp16-on-CUDA vs fp32-on-CPU generated-token agreement: {agreement:.3f}")
    assert agreement >= 0.5


@pytest.mark.parametrize("batch,gen,block,steps", GRID[:4])
def test_cuda_fused_fp32_token_exact_with_cpu(tiny_fused_onnx, pipeline, batch, gen, block, steps):
    fused = Pipeline.from_pretrained(tiny_fused_onnx, provider="cuda")
    ids, mask = prompts(batch, seed=gen + steps)
    kw = dict(steps=steps, gen_length=gen, block_length=block)
    np.testing.assert_array_equal(fused.generate_ids(ids, mask, **kw), pipeline.generate_ids(ids, mask, **kw))


def test_cuda_kv_cache_stays_on_device_and_matches_cpu(tiny_cache_onnx, pipeline):
    cpu = Pipeline.from_pretrained(tiny_cache_onnx)
    gpu = Pipeline.from_pretrained(tiny_cache_onnx, provider="cuda")
    ids, mask = prompts(3, seed=4)
    kw = dict(gen_length=16, block_length=8, steps=16)
    np.testing.assert_array_equal(gpu.generate_ids(ids, mask, cache="dual", refresh_every=1, **kw),
                                  pipeline.generate_ids(ids, mask, **kw))
    canvas = np.concatenate([ids, np.full((3, 8), 126336)], axis=1)
    am = np.ones_like(canvas)
    am[:, :ids.shape[1]] = mask
    window = np.broadcast_to(np.arange(canvas.shape[1] - 8, canvas.shape[1]), (3, 8)).copy()
    _, kv = gpu.kv_cache.refresh(canvas, am, window, logits=False)
    assert all(isinstance(v, ort.OrtValue) and v.device_name() == "cuda" for v in kv)
    for mode in ("dual", "prefix"):
        a = gpu.generate_ids(ids, mask, cache=mode, **kw)
        b = cpu.generate_ids(ids, mask, cache=mode, **kw)
        assert (a == b).mean() > 0.9  # fp32 on both: equal up to rare near-ties


def test_fp16_int4_export_on_cuda(tmp_path_factory, tiny_ckpt):
    """int4 weights with fp16 activations, the GPU variant: validated on CUDA, generates with and without the cache."""
    from llada_onnx.export import Quantization, export

    out = tmp_path_factory.mktemp("fp16-int4") / "tiny-fp16-int4"
    report = export(tiny_ckpt, out, dtype="fp16", device="cuda", cache=True, progress=False,
                    quantization=Quantization("int4")).validation
    print("fp16 int4 validation:", json.dumps(report))
    assert report["finite"] and report["variant"] == "int4-b32" and report["top_ids_agreement"] > 0.4
    pipe = Pipeline.from_pretrained(out, provider="cuda")
    ids, mask = prompts(3, seed=7)
    for options in ({}, {"cache": "dual"}):
        out_ids = pipe.generate_ids(ids, mask, steps=16, gen_length=16, block_length=8, **options)
        assert (out_ids[:, ids.shape[1]:] != pipe.manifest.id("mask_token_id")).all()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cuda_fused_cache_graph(tmp_path_factory, tiny_ckpt, dtype):
    """A CUDA export's fused KV-cache graph (each layer's rotary one RotaryEmbedding, its attention over the past
    one MultiHeadAttention): validated on CUDA, and its cached decoding refreshed every step (replayed as CUDA
    graphs) is token-exact with the same export's exact sampler in fp32, close to it in fp16."""
    from llada_onnx.export import export

    out = tmp_path_factory.mktemp("fused-cache") / f"tiny-{dtype}"
    export(tiny_ckpt, out, dtype=dtype, device="cuda", fusion="ort", cache=True, progress=False)
    ops = graph_ops(out / "cache.onnx")
    assert ops["RotaryEmbedding"] == ops["MultiHeadAttention"] == 2 and "Softmax" not in ops
    assert_cache_graph_exact(out, "cuda", 1.0 if dtype == "fp32" else 0.9)


@pytest.fixture(scope="module")
def graphed_and_plain(tiny_cache_onnx):
    return (Pipeline.from_pretrained(tiny_cache_onnx, provider="cuda"),
            Pipeline.from_pretrained(tiny_cache_onnx, provider="cuda", cuda_graphs=False))


@pytest.mark.parametrize("options", [{}, dict(threshold=0.7), dict(temperature=0.8, seed=2),
                                     dict(remasking="random", seed=4), dict(cfg_scale=1.5),
                                     dict(cache="dual"), dict(cache="dual", threshold=0.7),
                                     dict(cache="prefix", factor=1.0), dict(cache="dual", temperature=0.8, seed=2),
                                     dict(cache="dual", refresh_every=3)], ids=str)
def test_cuda_graphs_are_token_exact_with_uncaptured_runs(graphed_and_plain, options):
    """Replayed CUDA graphs compute what ordinary runs compute, over batch sizes: the exact sampler's full forwards
    (windows that narrow step by step: the head's rows are padded, not re-captured; logits fetches) and KV-cached
    steps (head widths, refreshes)."""
    graphed, plain = graphed_and_plain
    for batch, seed in ((1, 5), (3, 6)):
        ids, mask = prompts(batch, seed=seed)
        kw = dict(gen_length=16, block_length=8, steps=16, **options)
        np.testing.assert_array_equal(graphed.generate_ids(ids, mask, **kw), plain.generate_ids(ids, mask, **kw))
    graphed_session, plain_session = (p.kv_cache if "cache" in options else p.graph for p in (graphed, plain))
    captured = graphed_session._captured
    assert captured is not None and captured.graphs and plain_session._captured is None
    if "cache" not in options:
        assert {rows for _, _, rows in captured.graphs} == {32}  # one graph per canvas shape, whatever the window


def test_cuda_graph_step_outputs_match_an_uncaptured_step(graphed_and_plain):
    from llada_onnx.runtime.captured_steps import PinnedCache

    graphed, plain = graphed_and_plain
    ids, mask = prompts(2, seed=8)
    canvas = np.concatenate([ids, np.full((2, 8), graphed.manifest.id("mask_token_id"))], axis=1)
    am = np.ones_like(canvas)
    am[:, :ids.shape[1]] = mask
    start = canvas.shape[1] - 8
    _, kv = graphed.kv_cache.refresh(canvas, am, np.arange(start, start + 8)[None].repeat(2, 0), logits=False)
    _, plain_kv = plain.kv_cache.refresh(canvas, am, np.arange(start, start + 8)[None].repeat(2, 0), logits=False)
    assert isinstance(kv, PinnedCache)
    for width in (8, 3, 8, 1, 5):  # the head's width changes from step to step; the captured graph's does not
        window = np.arange(start, start + width)[None].repeat(2, 0)
        a = graphed.kv_cache.step(canvas, am, start, start + 8, window, kv, logits=True)
        b = plain.kv_cache.step(canvas, am, start, start + 8, window, plain_kv, logits=True)
        assert a.top_ids.shape == (2, width)
        np.testing.assert_array_equal(a.top_ids, b.top_ids)
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)


def test_cuda_graphs_beyond_the_pinned_shapes_run_uncaptured(tiny_cache_onnx, monkeypatch):
    from llada_onnx.runtime import captured_steps

    monkeypatch.setattr(captured_steps, "MAX_SHAPES", 1)
    monkeypatch.setattr(captured_steps, "MAX_CAPTURED_TOKENS", 8)  # the dual steps' block, not longer prefix steps
    pipe = Pipeline.from_pretrained(tiny_cache_onnx, provider="cuda")
    plain = Pipeline.from_pretrained(tiny_cache_onnx, provider="cuda", cuda_graphs=False)
    for batch in (1, 2):  # two canvas shapes: the second is not pinned
        ids, mask = prompts(batch, seed=9)
        for cache in ("dual", "prefix"):
            kw = dict(gen_length=16, block_length=8, steps=16, cache=cache)
            np.testing.assert_array_equal(pipe.generate_ids(ids, mask, **kw), plain.generate_ids(ids, mask, **kw))
    captured = pipe.kv_cache._captured
    assert len(captured.caches) == 1 and {fed for _, _, fed in captured.graphs} == {8}
    for batch in (1, 2):  # exact decoding: the forwards of the first canvas shape are captured, not the second's
        ids, mask = prompts(batch, seed=9)
        kw = dict(gen_length=16, block_length=8, steps=16)
        np.testing.assert_array_equal(pipe.generate_ids(ids, mask, **kw), plain.generate_ids(ids, mask, **kw))
    assert [key[0] for key in pipe.graph._captured.graphs] == [1]



def test_cuda_graph_forward_outputs_match_an_uncaptured_forward(graphed_and_plain):
    graphed, plain = graphed_and_plain
    ids, mask = prompts(2, seed=8)
    canvas = np.concatenate([ids, np.full((2, 8), graphed.manifest.id("mask_token_id"))], axis=1)
    am = np.ones_like(canvas)
    am[:, :ids.shape[1]] = mask
    for width in (8, 3, 8, 1, 40):
        positions = np.minimum(np.arange(width), canvas.shape[1] - 1)[None].repeat(2, 0)
        a, b = (p.graph.run(canvas, am, positions, logits=True) for p in (graphed, plain))
        assert a.top_ids.shape == (2, width)
        np.testing.assert_array_equal(a.top_ids, b.top_ids)
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)
    assert {rows for _, _, rows in graphed.graph._captured.graphs} == {32, 64}

# ---------------------------------------------------------------------------------------------- LLaDA-MoE
@pytest.fixture(scope="module")
def moe_cuda_exports(tmp_path_factory, moe_ckpt, moe_decomposed):
    """The decomposed export validated on the CPU, and a fused one, unvalidated: validating it on the CPU needs
    onnxruntime >= 1.32 there (onnxruntime-gpu 1.31.1's CPU kernel routes differently), so tokens are compared."""
    from llada_onnx.export import export

    fused = tmp_path_factory.mktemp("moe-cuda") / "fused"
    export(moe_ckpt, fused, cache=True, validate=False, progress=False)
    return fused, moe_decomposed


def test_cuda_moe_fused_rotary(tmp_path_factory, moe_ckpt, moe_model):
    """``--fusion ort --device cuda`` (one RotaryEmbedding for each layer's normalised queries and keys): fp32 and
    fp16 validated on CUDA; fp32 gives the torch sampler's tokens, exact and with the KV cache refreshed every step."""
    from llada_onnx.export import export
    from llada_onnx.models import generate

    base = tmp_path_factory.mktemp("moe-ort")
    for dtype in ("fp32", "fp16"):
        report = export(moe_ckpt, base / dtype, dtype=dtype, device="cuda", fusion="ort", cache=True,
                        progress=False).validation
        print(f"MoE --fusion ort {dtype} validation:", json.dumps(report))
        assert report["finite"] and report["top_ids_decisive_agreement"] >= 0.99
        for graph in ("model.onnx", "cache.onnx"):
            assert graph_ops(base / dtype / graph)["RotaryEmbedding"] == 2 * moe_model.config.num_hidden_layers
    ids, mask = prompts(3, seed=2, pad_id=156892)
    kw = dict(steps=8, gen_length=8, block_length=4)
    want = generate(moe_model, torch.from_numpy(ids), torch.from_numpy(mask), **kw).numpy()
    pipe = Pipeline.from_pretrained(base / "fp32", provider="cuda")
    np.testing.assert_array_equal(pipe.generate_ids(ids, mask, **kw), want)
    np.testing.assert_array_equal(pipe.generate_ids(ids, mask, cache="dual", refresh_every=1, **kw), want)


def test_cuda_moe_fp32_against_torch(moe_cuda_exports, moe_model):
    """Both forms of the experts on CUDA give the torch sampler's tokens (float32 products in float32: the
    provider's TF32 default is off, see runtime/providers.py)."""
    from llada_onnx.models import generate

    ids, mask = prompts(3, seed=2, pad_id=156892)
    fused, decomposed = (Pipeline.from_pretrained(e, provider="cuda") for e in moe_cuda_exports)
    for kw in (dict(steps=8, gen_length=8, block_length=4), dict(steps=8, gen_length=8, block_length=4,
                                                                  temperature=0.7, seed=3)):
        want = generate(moe_model, torch.from_numpy(ids), torch.from_numpy(mask), **kw).numpy()
        np.testing.assert_array_equal(decomposed.generate_ids(ids, mask, **kw), want)
        np.testing.assert_array_equal(fused.generate_ids(ids, mask, **kw), want)
    kw = dict(gen_length=16, block_length=8, steps=16)
    np.testing.assert_array_equal(fused.generate_ids(ids, mask, cache="dual", refresh_every=1, **kw),
                                  fused.generate_ids(ids, mask, **kw))
    plain = Pipeline.from_pretrained(moe_cuda_exports[0], provider="cuda", cuda_graphs=False)
    assert fused.graph._captured.graphs  # the fused MoE kernel replays inside a CUDA graph
    np.testing.assert_array_equal(fused.generate_ids(ids, mask, **kw), plain.generate_ids(ids, mask, **kw))


def test_cuda_moe_fp16_and_quantized_experts(tmp_path_factory):
    """fp16 (the fused MoE kernel in half precision) validated on CUDA and generating; int4 experts quantized from
    fp16 (the CUDA kernel's layout) validated on CUDA, by export and by quantize, as accurate as the CPU kernel's
    int4 experts, generating with and without the KV cache; experts quantized for the CPU are refused on CUDA
    rather than run wrongly."""
    from llada_onnx.export import Quantization, export
    from llada_onnx.export.quantize import quantize_export
    from llada_onnx.models.tiny import make_tiny_moe_checkpoint
    from llada_onnx.runtime import UnsupportedGraphError

    base = tmp_path_factory.mktemp("moe-fp16")
    ckpt = make_tiny_moe_checkpoint(base / "ckpt", expert_size=64, seed=2)
    report = export(ckpt, base / "fp16", dtype="fp16", device="cuda", cache=True, progress=False).validation
    print("MoE fp16 validation:", json.dumps(report))
    assert report["finite"] and report["top_ids_decisive_agreement"] >= 0.99
    ids, mask = prompts(2, seed=2, pad_id=156892)
    pipe = Pipeline.from_pretrained(base / "fp16", provider="cuda")
    for options in ({}, {"cache": "dual", "threshold": 0.9}):
        out = pipe.generate_ids(ids, mask, steps=16, gen_length=16, block_length=8, **options)
        assert (out[:, ids.shape[1]:] != 156895).all()
    cpu = export(ckpt, base / "int4-cpu", progress=False, quantization=Quantization("int4")).validation
    with pytest.raises(UnsupportedGraphError, match="--provider cpu"):
        Pipeline.from_pretrained(base / "int4-cpu", provider="cuda")
    int4 = export(ckpt, base / "int4", dtype="fp16", device="cuda", cache=True, progress=False,
                  quantization=Quantization("int4")).validation
    quantized = quantize_export(base / "fp16", base / "int4-q", Quantization("int4", 64), device="cuda",
                                progress=False)
    print("MoE int4 validation, CPU experts:", json.dumps(cpu), "CUDA experts:", json.dumps(int4),
          "quantized from fp16 (b64):", json.dumps(quantized))
    # int4's error against torch is the quantization's, as large as with the CPU kernel's experts (measured: 0.637
    # against 0.628 mean |logits diff|): a weight layout the CUDA kernel misread would be far larger
    assert int4["provider"] == "CUDAExecutionProvider"
    assert int4["logits_mean_abs_diff"] <= 1.25 * cpu["logits_mean_abs_diff"]
    assert quantized["logits_mean_abs_diff"] <= 1.25 * cpu["logits_mean_abs_diff"]
    for export_dir in (base / "int4", base / "int4-q"):
        pipe = Pipeline.from_pretrained(export_dir, provider="cuda")
        for options in ({}, {"cache": "dual", "threshold": 0.9}):
            out = pipe.generate_ids(ids, mask, steps=16, gen_length=16, block_length=8, **options)
            assert (out[:, ids.shape[1]:] != 156895).all()

# ---------------------------------------------------------------------------------------------- LLaDA2
@pytest.fixture(scope="module")
def llada2_cuda(tmp_path_factory):
    """A tiny LLaDA2 checkpoint, its decomposed export (validated on the CPU), a fused one, and one with
    ``--fusion ort --device cuda`` (validated on CUDA; one partial RotaryEmbedding for each layer's normalised
    queries and keys)."""
    from llada_onnx.export import export
    from llada_onnx.models.llada2 import LLaDA2Config
    from llada_onnx.models.tiny import make_tiny_llada2_checkpoint

    base = tmp_path_factory.mktemp("llada2-cuda")
    ckpt = make_tiny_llada2_checkpoint(base / "ckpt")
    export(ckpt, base / "decomposed", moe="decomposed", progress=False)
    export(ckpt, base / "fused", validate=False, progress=False)
    export(ckpt, base / "ort", device="cuda", fusion="ort", progress=False)
    assert graph_ops(base / "ort" / "model.onnx")["RotaryEmbedding"] == 2 * LLaDA2Config.from_pretrained(
        ckpt).num_hidden_layers
    return ckpt, base


def test_cuda_llada2_block_cache_against_torch(llada2_cuda):
    """On CUDA, the block cache kept on the device gives the uncached canvases and the torch sampler's tokens,
    token for token (greedy, and sampling with seeded noise), both forms of the experts and the ORT-fused graph."""
    import dataclasses

    from llada_onnx.models.block_sampler import generate
    from llada_onnx.models.llada2 import LLaDA2Model
    from llada_onnx.runtime.block_settings import BlockSettings
    from llada_onnx.runtime.noise import Noise

    ckpt, base = llada2_cuda
    model = LLaDA2Model.from_pretrained(ckpt)
    ids, mask = prompts(3, seed=2, pad_id=156892)
    for form in ("decomposed", "fused", "ort"):
        pipe = Pipeline.from_pretrained(base / form, provider="cuda")
        for s in (BlockSettings(gen_length=32, block_length=8, steps=8),
                  BlockSettings(gen_length=32, block_length=8, steps=8, threshold=0.9, temperature=1.0, top_k=50)):
            want = generate(model, torch.from_numpy(ids), torch.from_numpy(mask), settings=s, mask_id=156895,
                            eos_id=156892, pad_id=156892, noise=Noise.of(None, 7)).numpy()
            cached, uncached = (pipe.generate_ids(ids, mask, seed=7, **dataclasses.asdict(dataclasses.replace(
                s, cache=cache))) for cache in ("block", "none"))
            np.testing.assert_array_equal(cached, uncached)
            np.testing.assert_array_equal(cached, want)


def test_cuda_llada2_fp16_export(llada2_cuda):
    """fp16, unfused and ORT-fused, validated on CUDA (the full forward and the block cache); the fused one
    generating every position."""
    from llada_onnx.export import export

    ckpt, base = llada2_cuda
    for fusion in ("none", "ort"):
        report = export(ckpt, base / f"fp16-{fusion}", dtype="fp16", device="cuda", fusion=fusion,
                        progress=False).validation
        print(f"LLaDA2 fp16 --fusion {fusion} validation:", json.dumps(report))
        assert report["finite"] and report["top_ids_decisive_agreement"] >= 0.99
        assert report["block_cache"]["cached_mean_abs_diff"] <= report["block_cache"]["tolerance"]
    ids, mask = prompts(2, seed=2, pad_id=156892)
    out = Pipeline.from_pretrained(base / "fp16-ort", provider="cuda").generate_ids(ids, mask, gen_length=16,
                                                                                   block_length=8)
    assert (out[:, ids.shape[1]:] != 156895).all()
