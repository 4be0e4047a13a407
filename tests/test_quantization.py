"""Quantized exports: which weights become int8/int4, what the manifest and validation record, that the runtime
runs them (KV-cache graph included), that a trained model keeps its predictions, and the errors."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from llada_onnx.export import ExportError, Quantization, export
from llada_onnx.export.quantize import quantize_graph
from llada_onnx.runtime import Pipeline, default_onnx_dir
from llada_onnx.runtime.manifest import MANIFEST_FILE, Manifest

from conftest import graph_ops, prompts

LINEARS_PER_LAYER = 4  # q|k|v, attn_out, ff_proj|up, ff_out (the exporter joins projections)
KW = dict(steps=16, gen_length=16, block_length=8)


def data_bytes(export_dir) -> int:
    return sum(p.stat().st_size for p in export_dir.glob("*.data"))


@pytest.fixture(scope="session")
def int8_onnx(tmp_path_factory, tiny_ckpt):
    out = tmp_path_factory.mktemp("quantized") / "int8"
    export(tiny_ckpt, out, progress=False, quantization=Quantization("int8"))
    return out


@pytest.fixture(scope="session")
def int4_onnx(tmp_path_factory, tiny_ckpt):
    out = tmp_path_factory.mktemp("quantized") / "int4"
    export(tiny_ckpt, out, progress=False, cache=True, quantization=Quantization("int4"))
    return out


def test_int8_quantizes_every_linear_layer(int8_onnx, tiny_onnx, tiny_model):
    n_layers = tiny_model.config.n_layers
    counts = graph_ops(int8_onnx / "model.onnx")
    assert counts["DynamicQuantizeMatMul"] == LINEARS_PER_LAYER * n_layers + 1  # + the LM head
    assert counts["MatMul"] == 2 * n_layers  # attention's activation x activation products stay float
    raw = json.loads((int8_onnx / MANIFEST_FILE).read_text())
    assert Manifest.load(int8_onnx).variant == raw["variant"] == "int8"
    assert raw["quantization"] == {"method": "int8", "keep_head": False} and raw["dtype"] == "fp32"
    assert data_bytes(int8_onnx) < 0.7 * data_bytes(tiny_onnx)  # the embedding table stays fp32


def test_int4_quantizes_linears_head_and_embeddings(int4_onnx, tiny_onnx, tiny_model):
    n_layers = tiny_model.config.n_layers
    counts = graph_ops(int4_onnx / "model.onnx")
    assert counts["MatMulNBits"] == LINEARS_PER_LAYER * n_layers + 1 and counts["GatherBlockQuantized"] == 1
    raw = json.loads((int4_onnx / MANIFEST_FILE).read_text())
    assert raw["variant"] == "int4-b32" and raw["quantized_ops"] == {"MatMulNBits": 9, "GatherBlockQuantized": 1}
    assert raw["quantization"] == {"method": "int4", "block_size": 32, "accuracy_level": 0, "keep_head": False}
    assert data_bytes(int4_onnx) < 0.2 * data_bytes(tiny_onnx)
    # the KV-cache graph is quantized the same way and reads the main graph's quantized weights: no data of its own
    assert graph_ops(int4_onnx / "cache.onnx")["MatMulNBits"] == counts["MatMulNBits"]
    assert sorted(p.name for p in int4_onnx.glob("*.data")) == ["model.onnx.data"]


@pytest.mark.parametrize("name", ["int8_onnx", "int4_onnx"])
def test_validation_records_the_variant_against_torch(request, name):
    report = json.loads((request.getfixturevalue(name) / "validation.json").read_text())
    assert report["variant"] in ("int8", "int4-b32") and report["reference"] == "torch fp32"
    assert report["finite"] and report["logits_tolerance"] is None
    assert 0 < report["logits_mean_abs_diff"] < 0.25 * report["logit_scale"]
    assert report["top_ids_agreement"] > 0.4 and 0 < report["top_prob_max_abs_diff"] < 1


def test_keep_head_and_block_size(tmp_path, tiny_onnx):
    source = tiny_onnx / "model.onnx"
    vocab = Manifest.load(tiny_onnx).vocab_size
    kept = quantize_graph(source, tmp_path / "kept.onnx", Quantization("int4", keep_head=True), vocab)
    assert kept == {"MatMulNBits": LINEARS_PER_LAYER * 2}  # the linear layers only: head and embedding table stay fp32
    int8_kept = quantize_graph(source, tmp_path / "int8.onnx", Quantization("int8", keep_head=True), vocab)
    assert int8_kept == {"DynamicQuantizeMatMul": LINEARS_PER_LAYER * 2}
    quantize_graph(source, tmp_path / "b16.onnx", Quantization("int4", block_size=16, accuracy_level=4), vocab)
    nodes = [n for n in onnx.load(str(tmp_path / "b16.onnx"), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    attrs = {a.name: a.i for a in nodes[0].attribute}
    assert attrs["block_size"] == 16 and attrs["accuracy_level"] == 4 and attrs["bits"] == 4


def test_tied_embeddings_stay_float(tmp_path, tied_onnx):
    """The tied head reads the embedding table itself: a quantized copy beside it would only add bytes."""
    counts = quantize_graph(tied_onnx / "model.onnx", tmp_path / "q.onnx", Quantization("int4"),
                            Manifest.load(tied_onnx).vocab_size)
    assert "GatherBlockQuantized" not in counts
    assert (tmp_path / "q.onnx.data").stat().st_size < (tied_onnx / "model.onnx.data").stat().st_size


@pytest.mark.parametrize("name", ["int8_onnx", "int4_onnx"])
def test_runtime_generates_with_quantized_exports(request, name, pipeline):
    pipe = Pipeline.from_pretrained(request.getfixturevalue(name))
    ids, mask = prompts(3, seed=7)
    out = pipe.generate_ids(ids, mask, **KW)
    assert out.shape == (3, ids.shape[1] + 16) and (out[:, ids.shape[1]:] != pipe.manifest.id("mask_token_id")).all()
    np.testing.assert_array_equal(out[:, : ids.shape[1]], ids)


def test_quantized_cache_graph_with_refresh_every_step_equals_uncached(int4_onnx):
    pipe = Pipeline.from_pretrained(int4_onnx)
    ids, mask = prompts(2, seed=3)
    exact = pipe.generate_ids(ids, mask, **KW)
    np.testing.assert_array_equal(pipe.generate_ids(ids, mask, cache="dual", refresh_every=1, **KW), exact)


def test_trained_model_keeps_its_predictions(tmp_path):
    """On the shipped (trained) model the quantized graphs predict what fp32 predicts at most masked positions."""
    pipe = Pipeline.from_pretrained()
    text = ("HAMLET.\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
            "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles,\n"
            "And by opposing end them? To die, to sleep,\nNo more; and by a sleep to say we end\n"
            "The heart-ache and the thousand natural shocks\nThat flesh is heir to.")
    ids = np.array([pipe.codec.tokenizer.encode(text).ids])
    masked = np.random.default_rng(0).random(ids.shape) < 0.5
    noisy = np.where(masked, pipe.manifest.id("mask_token_id"), ids)
    feeds = {"input_ids": noisy, "attention_mask": np.ones_like(noisy), "positions": np.nonzero(masked)[1][None]}
    source = default_onnx_dir() / "model.onnx"
    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, feeds)
    for q in (Quantization("int8"), Quantization("int4"), Quantization("int4", block_size=128)):
        quantize_graph(source, tmp_path / f"{q.variant}.onnx", q, pipe.manifest.vocab_size)
        session = ort.InferenceSession(str(tmp_path / f"{q.variant}.onnx"), providers=["CPUExecutionProvider"])
        logits, top_ids, _ = session.run(None, feeds)
        assert np.abs(logits - reference[0]).mean() < 0.15 * reference[0].std(), q.variant
        assert (top_ids == reference[1]).mean() >= 0.6, q.variant


def test_errors(tmp_path, tiny_ckpt):
    with pytest.raises(ExportError, match="int8.*fp32 graph"):
        export(tiny_ckpt, tmp_path / "out", dtype="fp16", validate=False, progress=False,
               quantization=Quantization("int8"))
    with pytest.raises(ExportError, match="block size 48"):
        export(tiny_ckpt, tmp_path / "out", progress=False, quantization=Quantization("int4", block_size=48))
    with pytest.raises(ExportError, match="unknown quantization"):
        export(tiny_ckpt, tmp_path / "out", progress=False, quantization=Quantization("int3"))
    with pytest.raises(ExportError, match="accuracy level"):
        export(tiny_ckpt, tmp_path / "out", progress=False, quantization=Quantization("int4", accuracy_level=7))
    assert not any(tmp_path.iterdir())


def test_int8_computes_what_quantize_dynamic_makes(tmp_path, tiny_onnx):
    """The int8 graph, written weight by weight, gives the logits of ``quantize_dynamic``'s graph (the same
    weights and scales, the kernel onnxruntime fuses that graph into) to the bit."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    manifest = Manifest.load(tiny_onnx)
    ours, theirs = tmp_path / "ours.onnx", tmp_path / "theirs.onnx"
    assert "DynamicQuantizeMatMul" in quantize_graph(manifest.graph_path, ours, Quantization("int8"),
                                                     manifest.vocab_size)
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(manifest.graph_path, theirs, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
    finally:
        logging.disable(logging.NOTSET)
    ids, mask = prompts(2, seed=4)
    feeds = {"input_ids": ids, "attention_mask": mask,
             "positions": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()}
    a, b = (ort.InferenceSession(str(g), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
            for g in (ours, theirs))
    np.testing.assert_array_equal(a, b)


def test_cli_exports_fp16_int4_for_gpus(tmp_path, tied_ckpt):
    """int4 with fp16 scales and activations (CUDA/DirectML); validated on CUDA in test_cuda.py."""
    from llada_onnx.cli import main

    out = tmp_path / "fp16-int4"
    assert main(["export", str(tied_ckpt), str(out), "--dtype", "fp16", "--quantize", "int4", "--block-size", "128",
                 "--no-validate"]) == 0
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    scales = [t for t in graph.graph.initializer if t.name.endswith("_scales")]
    assert scales and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scales)
    assert Manifest.load(out).variant == "int4-b128" and Manifest.load(out).dtype == "fp16"


def test_scratch_holds_the_float_graph_and_is_emptied_on_failure(tmp_path, tiny_ckpt, monkeypatch):
    """``scratch``: the float graph is written there, not beside the output, and removed when the export fails; a
    full scratch disk is named as such; asking for it without quantization, or naming a missing folder, is
    refused."""
    from llada_onnx.export import exporter

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    seen = []

    def fail(source, *a, **k):
        seen.append((source.parent.parent, (source.parent / (source.name + ".data")).stat().st_size))
        raise ExportError("quantizer failed")

    monkeypatch.setattr(exporter, "quantize_graph", fail)
    with pytest.raises(ExportError, match="quantizer failed"):
        export(tiny_ckpt, tmp_path / "out", progress=False, quantization=Quantization("int4"), scratch=scratch)
    assert seen[0][0] == scratch and seen[0][1] > 0
    assert not any(scratch.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["scratch"]
    import errno

    import torch

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", full)
    with pytest.raises(ExportError, match=f"the scratch folder {scratch} is full .*choose another --scratch"):
        export(tiny_ckpt, tmp_path / "out", progress=False, quantization=Quantization("int4"), scratch=scratch)
    assert not any(scratch.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["scratch"]
    with pytest.raises(ExportError, match="without --quantize it is unused"):
        export(tiny_ckpt, tmp_path / "out", progress=False, scratch=scratch)
    with pytest.raises(ExportError, match="does not exist"):
        export(tiny_ckpt, tmp_path / "out", progress=False, quantization=Quantization("int4"),
               scratch=tmp_path / "missing")


def test_quantize_an_existing_export(tmp_path, tiny_cache_onnx, int4_onnx):
    """``llada-onnx quantize``: no checkpoint, no re-trace; the same graph as quantizing at export time."""
    from llada_onnx.cli import main
    from llada_onnx.export import ExportError
    from llada_onnx.export.quantize import QuantizationError, quantize_export

    out = tmp_path / "int4"
    assert main(["quantize", str(tiny_cache_onnx), str(out), "--quantize", "int4"]) == 0
    raw = json.loads((out / MANIFEST_FILE).read_text())
    assert raw["variant"] == "int4-b32" and raw["provenance"]["quantized_from"] == str(tiny_cache_onnx)
    assert graph_ops(out / "model.onnx") == graph_ops(int4_onnx / "model.onnx")
    assert sorted(p.name for p in out.glob("*.data")) == ["model.onnx.data"]  # cache.onnx shares it
    assert data_bytes(out) == data_bytes(int4_onnx)
    report = json.loads((out / "validation.json").read_text())
    assert report["reference"] == "float export (fp32)" and report["finite"] and report["top_ids_agreement"] > 0.4
    pipe = Pipeline.from_pretrained(out)
    ids, mask = prompts(2, seed=3)
    assert pipe.generate_ids(ids, mask, cache="dual", **KW).shape == (2, ids.shape[1] + 16)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_export(out, tmp_path / "again", Quantization("int8"), progress=False)
    with pytest.raises(ExportError, match="--force"):
        quantize_export(tiny_cache_onnx, out, Quantization("int8"), progress=False)
    assert main(["quantize", str(tiny_cache_onnx), str(tmp_path / "x"), "--quantize", "int4", "--block-size", "24"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int4"]  # nothing half-written
