"""``llada-onnx verify`` and ``Pipeline.forward_logits``: the user's equivalence check passes on correct exports and
fails, naming the first failing check, on broken ones."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from llada_onnx.runtime import LladaOnnxError, default_checkpoint_dir, default_onnx_dir
from llada_onnx.runtime.manifest import MANIFEST_FILE

from conftest import prompts

ENTRY_POINT = str(Path(sys.executable).with_name("llada-onnx"))


def verify(*args):
    return subprocess.run([ENTRY_POINT, "verify", *map(str, args)], capture_output=True, text=True, timeout=600)


def scale_weight(export: Path, pick, factor: float) -> None:
    """Multiply the first float weight of the data file that ``pick(tensor)`` accepts by ``factor``."""
    model = onnx.load(str(export / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                  and t.data_location == onnx.TensorProto.EXTERNAL and pick(t))
    info = {e.key: e.value for e in tensor.external_data}
    data = export / info["location"]
    raw = bytearray(data.read_bytes())
    start, length = int(info.get("offset", 0)), int(info["length"])
    values = np.frombuffer(bytes(raw[start:start + length]), dtype=np.float32) * factor
    raw[start:start + length] = values.astype(np.float32).tobytes()
    data.write_bytes(bytes(raw))


def test_forward_logits_are_the_torch_models(pipeline, loaded_tiny):
    ids, mask = prompts(3, seed=4)
    logits = pipeline.forward_logits(ids, mask)
    with torch.no_grad():
        want = loaded_tiny(torch.from_numpy(ids), torch.from_numpy(mask), always_mask=True).numpy()
    assert logits.shape == (3, ids.shape[1], 126464) and logits.dtype == np.float32
    valid = mask.astype(bool)
    np.testing.assert_allclose(logits[valid], want[valid], atol=1e-4 * want.std(), rtol=0)
    assert pipeline.forward_logits(ids[0]).shape == (1, ids.shape[1], 126464)
    with pytest.raises(LladaOnnxError, match="vocabulary"):
        pipeline.forward_logits([[126464]])


def test_verify_passes_on_the_default_model_and_its_export():
    res = verify(default_checkpoint_dir(), default_onnx_dir(), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["passed"] and report["exact"] and len(report["cases"]) == 4
    assert all(case["token_exact"] for case in report["cases"])
    assert report["logits"]["decisive_top1_agreement"] == 1.0 and "[runtime 4/4]" in res.stderr


def test_verify_full_grid_and_own_prompts(tmp_path, tiny_ckpt, tiny_onnx):
    from llada_onnx.export.verify import GRIDS, table, verify as run_verify

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("the king is\na queen and a lord\n")
    report = run_verify(tiny_ckpt, tiny_onnx, prompts=["the king is", "a queen and a lord"], grid="full")
    assert report["passed"] and len(report["cases"]) == len(GRIDS["full"]) == 15
    assert table(report).endswith("PASSED")
    res = verify(tiny_ckpt, tiny_onnx, "--prompts", prompt_file)
    assert res.returncode == 0 and res.stdout.rstrip().endswith("PASSED"), res.stderr[-3000:]


def test_the_batch_always_has_a_left_padded_row():
    from llada_onnx.export.verify import with_padded_row

    ids, mask = with_padded_row(np.array([[5, 6, 7], [8, 9, 10]]), np.ones((2, 3), dtype=np.int64), pad_id=1)
    assert ids.tolist()[-1] == [1, 6, 7] and mask.tolist()[-1] == [0, 1, 1]
    padded = np.array([[0, 1, 1], [1, 1, 1]])
    assert with_padded_row(np.ones((2, 3), dtype=np.int64), padded, pad_id=1)[1] is padded


def test_verify_fails_on_a_perturbed_weight(tmp_path, tiny_ckpt, tiny_onnx):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_onnx, broken)
    scale_weight(broken, lambda t: 126464 in t.dims and "wte" not in t.name, 1.01)  # the LM head
    res = verify(tiny_ckpt, broken, "--json")
    assert res.returncode == 1
    report = json.loads(res.stdout)
    assert not report["passed"] and report["first_failure"].startswith("logits: max |diff|")
    assert res.stderr.strip().splitlines()[-1].startswith("llada-onnx verify: failed: logits: max |diff|")


def test_verify_fails_on_a_wrong_mask_id(tmp_path, tiny_ckpt, tiny_onnx):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_onnx, broken)
    raw = json.loads((broken / MANIFEST_FILE).read_text())
    raw["special_ids"]["mask_token_id"] = 126335
    (broken / MANIFEST_FILE).write_text(json.dumps(raw))
    res = verify(tiny_ckpt, broken)
    assert res.returncode == 1
    assert "failed: sampler: gen_length 16, block_length 8, steps 16 is not token-exact" in res.stderr
    assert res.stdout.rstrip().endswith("is not token-exact")


def test_verify_judges_a_quantized_export_by_loss(tmp_path):
    from llada_onnx.export import Quantization
    from llada_onnx.export.quantize import quantize_export
    from llada_onnx.export.verify import verify as run_verify

    int8 = tmp_path / "int8"
    quantize_export(default_onnx_dir(), int8, Quantization("int8"), progress=False)
    report = run_verify(default_checkpoint_dir(), int8)
    assert not report["exact"] and report["loss"]["tolerance"] == 0.02
    assert report["passed"], report["first_failure"]
    assert abs(report["loss"]["relative_change"]) < 0.02, report["loss"]
    scale_weight(int8, lambda t: "wte" in t.name, 3.0)  # the embedding table stays float in int8 exports
    report = run_verify(default_checkpoint_dir(), int8)
    assert not report["passed"] and report["first_failure"].startswith(("masked-token loss", "logits: decisive"))


def test_verify_loads_torch_and_the_export_one_after_the_other(monkeypatch, tiny_ckpt, tiny_onnx):
    """The torch model is freed before the export is loaded (a memory plan for large checkpoints)."""
    import gc
    import weakref

    from llada_onnx.export import verify as module

    alive = []
    real_load, real_open = module.load_model, module.Pipeline.from_pretrained

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        alive.append(weakref.ref(model))
        return model

    def open_export(*args, **kwargs):
        gc.collect()
        assert all(ref() is None for ref in alive), "the torch model is still alive when the export loads"
        return real_open(*args, **kwargs)

    monkeypatch.setattr(module, "load_model", load)
    monkeypatch.setattr(module.Pipeline, "from_pretrained", open_export)
    assert module.verify(tiny_ckpt, tiny_onnx)["passed"] and alive


def test_a_bf16_reference_judges_approximately():
    from llada_onnx.export.verify import verify as run_verify

    report = run_verify(default_checkpoint_dir(), default_onnx_dir(), torch_dtype="bf16")
    assert report["torch"] == "bf16 on cpu" and not report["exact"] and report["loss"]["tolerance"] == 0.01
    assert report["passed"], report["first_failure"]
