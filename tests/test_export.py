"""The export stage: graph validity, agreement with torch at many shapes, manifest, errors and atomicity."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from llada_onnx.export import ExportError, ValidationError, export
from llada_onnx.models import LLaDAModel
from llada_onnx.runtime.contract import FORWARD
from llada_onnx.runtime.manifest import MANIFEST_FILE, Manifest

from conftest import graph_ops


def run_graph(onnx_dir, ids, mask, positions):
    m = Manifest.load(onnx_dir)
    s = ort.InferenceSession(str(m.graph_path), providers=["CPUExecutionProvider"])
    return s.run(None, {"input_ids": ids, "attention_mask": mask, "positions": positions})


@pytest.mark.parametrize("export_name,ckpt_name", [("tiny", "tiny"), ("gqa_sharded", "gqa_sharded"), ("tied", "tied"),
                                                    ("tiny_fused", "tiny"), ("gqa_fused", "gqa_sharded")])
def test_graph_checks_and_matches_torch(request, export_name, ckpt_name):
    onnx_dir = request.getfixturevalue(f"{export_name}_onnx")
    model = LLaDAModel.from_pretrained(request.getfixturevalue(f"{ckpt_name}_ckpt"))
    if Manifest.load(onnx_dir).fusion == "none":  # the checker knows no onnxruntime contrib ops
        onnx.checker.check_model(str(onnx_dir / "model.onnx"))
    assert sorted(p.name for p in onnx_dir.glob("*.data")) == ["model.onnx.data"]
    rng = np.random.default_rng(0)
    for batch, length, count in [(1, 1, 1), (1, 7, 1), (2, 9, 9), (3, 16, 5), (2, 33, 33)]:
        ids = rng.integers(0, 200, size=(batch, length))
        mask = np.ones_like(ids)
        mask[0, : length // 3] = 0  # a left-padded row
        mask[0, -1] = 1
        positions = np.sort(rng.integers(0, length, size=(batch, count)), axis=1)
        logits, top_ids, top_prob = run_graph(onnx_dir, ids, mask, positions)
        with torch.no_grad():
            ref = model(*(torch.from_numpy(a) for a in (ids, mask, positions)), always_mask=True).numpy()
        assert logits.shape == (batch, count, model.config.embedding_size)
        np.testing.assert_allclose(logits, ref, atol=1e-4 * max(1.0, ref.std()), rtol=0)
        np.testing.assert_array_equal(top_ids, ref.argmax(-1))
        np.testing.assert_allclose(top_prob, torch.softmax(torch.from_numpy(ref), -1).amax(-1).numpy(), atol=1e-5)


def test_fusion_rewrites_attention_and_norms(tiny_fused_onnx, tiny_onnx):
    m = Manifest.load(tiny_fused_onnx)
    raw = json.loads((tiny_fused_onnx / MANIFEST_FILE).read_text())
    assert m.fusion == "ort" and Manifest.load(tiny_onnx).fusion == "none"
    ops = graph_ops(tiny_fused_onnx / "model.onnx")
    assert ops["MultiHeadAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] >= 2
    assert ops["Softmax"] == 1 and "ReduceMean" not in ops  # the one Softmax left is top_prob's (CPU summaries)
    assert raw["fusions"]["sdpa_via_mha"] == 2
    # queries and keys are rotated by RotaryEmbedding on the split projection, not in float32 multiplies over
    # transposed heads; one attention bias serves both layers
    assert raw["fusions"]["rotary_attention"] == 2 and ops["RotaryEmbedding"] == 4
    assert "Transpose" not in ops and "Neg" not in ops and ops["Expand"] == 3  # mask, bias, head rows
    assert sorted(p.name for p in tiny_fused_onnx.iterdir() if "onnx" in p.name and p.suffix != ".json") == [
        "model.onnx", "model.onnx.data"]  # the unfused trace is gone


def test_bidirectionality_survives_export(tiny_onnx):
    ids = np.arange(10, dtype=np.int64)[None] + 5
    mask = np.ones_like(ids)
    pos = np.array([[0]])
    changed = ids.copy()
    changed[0, -1] += 1
    a, b = run_graph(tiny_onnx, ids, mask, pos)[0], run_graph(tiny_onnx, changed, mask, pos)[0]
    assert np.abs(a - b).max() > 1e-3


def test_manifest_round_trips(tiny_onnx, tiny_ckpt):
    m = Manifest.load(tiny_onnx)
    raw = json.loads((tiny_onnx / MANIFEST_FILE).read_text())
    assert m.graph == "model.onnx" and m.dtype == "fp32" and m.opset == 20
    assert (m.architecture, m.sampler, m.graphs) == ("LLaDAModelLM", "llada", {"forward": "model.onnx"})
    assert m.vocab_size == 126464 and m.max_sequence_length == 4096
    assert m.ids == {"mask_token_id": 126336, "eos_token_id": 126081, "eot_token_id": 126348,
                     "bos_token_id": 126080, "pad_token_id": 126081}
    assert m.chat_template and "<|start_header_id|>" in m.chat_template
    assert raw["provenance"]["torch"] == torch.__version__ and len(raw["provenance"]["source_sha256"]) == 64
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (tiny_onnx / name).is_file()
    report = json.loads((tiny_onnx / "validation.json").read_text())
    assert report["top_ids_agreement"] == 1.0 and report["logits_max_abs_diff"] < report["logits_tolerance"]
    onnx_model = onnx.load(str(tiny_onnx / "model.onnx"), load_external_data=False)
    assert [i.name for i in onnx_model.graph.input] == list(FORWARD.input_names(2))
    assert [o.name for o in onnx_model.graph.output] == list(FORWARD.output_names(2))


def test_errors(tmp_path, tiny_ckpt):
    with pytest.raises(FileNotFoundError, match="config.json"):
        export(tmp_path, tmp_path / "out", progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a LLaDA checkpoint"):
        export(foreign, tmp_path / "out", progress=False)
    no_weights = tmp_path / "noweights"
    shutil.copytree(tiny_ckpt, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        export(no_weights, tmp_path / "out", progress=False)
    unsupported = tmp_path / "alibi"
    shutil.copytree(tiny_ckpt, unsupported)
    cfg = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps(dict(cfg, alibi=True)))
    with pytest.raises(ValueError, match="alibi"):
        export(unsupported, tmp_path / "out", progress=False)
    with pytest.raises(ExportError, match="unknown fusion"):
        export(tiny_ckpt, tmp_path / "out", fusion="magic", progress=False)
    for opset in (17, 99):
        with pytest.raises(ExportError, match="opset"):
            export(tiny_ckpt, tmp_path / "out", opset=opset, progress=False)
    with pytest.raises(ExportError, match="fp16.*--device cuda"):
        export(tiny_ckpt, tmp_path / "out", dtype="fp16", progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    for force in (False, True):  # not an export: --force does not delete it either
        with pytest.raises(ExportError, match="not a llada-onnx export.*keep.txt"):
            export(tiny_ckpt, busy, force=force, progress=False)
    assert (busy / "keep.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alibi", "busy", "foreign", "noweights"]


def test_disk_space_is_checked(tmp_path, tiny_ckpt, monkeypatch):
    import collections
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    with pytest.raises(ExportError, match="not enough disk space"):
        export(tiny_ckpt, tmp_path / "out", progress=False)


@pytest.mark.parametrize("stage", ["trace", "fuse", "validate", "interrupt"])
def test_failure_leaves_nothing_behind(tmp_path, tiny_ckpt, monkeypatch, stage):
    from llada_onnx.export import exporter, fusion

    def boom(*a, **k):
        if stage == "interrupt":
            raise KeyboardInterrupt
        raise ValidationError("simulated") if stage == "validate" else RuntimeError("simulated")

    if stage == "fuse":  # a graph the rules do not match: a clear error, not a slow "fused" export
        monkeypatch.setattr(fusion, "REQUIRED", ("NoSuchFusedOp",))
    else:
        monkeypatch.setattr(exporter, {"trace": "_trace"}.get(stage, "validate_export"), boom)
    out = tmp_path / "out"
    with pytest.raises((RuntimeError, KeyboardInterrupt), match="NoSuchFusedOp" if stage == "fuse" else None):
        export(tiny_ckpt, out, progress=False, fusion="ort" if stage == "fuse" else "none")
    assert list(tmp_path.iterdir()) == []  # no output, no partial temp directory


def test_force_replaces_and_cli_exports(tmp_path, tied_ckpt, capsys):
    from llada_onnx.cli import main

    out = tmp_path / "out"
    assert main(["export", str(tied_ckpt), str(out)]) == 0
    err = capsys.readouterr().err
    assert "validating" in err and "top_ids agreement 100.0000%" in err and "peak RSS" in err
    (out / "validation.json").write_text("stale")
    assert main(["export", str(tied_ckpt), str(out)]) == 2
    assert "earlier export; pass --force" in capsys.readouterr().err
    assert main(["export", str(tied_ckpt), str(out), "--force"]) == 0
    assert json.loads((out / "validation.json").read_text())["top_ids_agreement"] == 1.0
