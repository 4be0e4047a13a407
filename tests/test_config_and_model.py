"""The torch model: config reading, the LLADA.md facts, masking, GQA/tied variants, loading and its errors."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llada_onnx.models import (CheckpointError, LLaDAConfig, LLaDAModel, UnsupportedConfigError, make_tiny_checkpoint,
                               make_tiny_model)
from llada_onnx.models.modeling import apply_rotary, rotary_tables

REFERENCE = Path(__file__).resolve().parents[1] / "bench" / "configs" / "llada-8b-instruct"  # the official files


def official_config() -> dict:
    return {"model_type": "llada", "d_model": 64, "n_heads": 4, "n_kv_heads": 4, "n_layers": 1,
            "mlp_hidden_size": 128, "vocab_size": 300, "embedding_size": 300, "rope": True}


def test_reads_the_real_8b_config_and_ids():
    cfg = LLaDAConfig.from_pretrained(REFERENCE)
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers) == (4096, 32, 32, 32)
    assert (cfg.mlp_hidden_size, cfg.vocab_size, cfg.embedding_size) == (12288, 126464, 126464)
    assert cfg.rope_theta == 500000.0 and cfg.rms_norm_eps == 1e-5 and not cfg.weight_tying
    assert cfg.special_ids() == {"mask_token_id": 126336, "eos_token_id": 126081, "pad_token_id": 126081,
                                 "bos_token_id": 126080, "eot_token_id": 126348}
    from llada_onnx.models.llada import parameter_count
    assert parameter_count(cfg) == 8_015_581_184  # LLADA.md: the 8B checkpoint's parameter count


def test_ids_come_from_the_checkpoint_files(tmp_path):
    ids = {"mask_token_id": 5, "eos_token_id": 6, "pad_token_id": 6, "bos_token_id": 7, "eot_token_id": 9}
    make_tiny_checkpoint(tmp_path, vocab_size=300, d_model=32, n_heads=2, n_layers=1, ids=ids)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "bos_token_id" not in cfg  # BOS lives only in generation_config.json, as in the 8B checkpoint
    assert LLaDAConfig.from_pretrained(tmp_path).special_ids() == ids


@pytest.mark.parametrize("field,value,needle", [
    ("alibi", True, "alibi"), ("rope", False, "rope"), ("block_type", "sequential", "block_type"),
    ("include_bias", True, "include_bias"), ("layer_norm_type", "default", "layer_norm_type"),
    ("model_type", "llama", "model_type"), ("scale_logits", True, "scale_logits"),
])
def test_unsupported_configs_name_the_field(field, value, needle):
    with pytest.raises(UnsupportedConfigError, match=needle):
        LLaDAConfig.from_dict(dict(official_config(), **{field: value}))


def test_mlp_ratio_used_only_when_hidden_size_unset():
    raw = dict(official_config(), mlp_ratio=3)
    assert LLaDAConfig.from_dict(raw).mlp_hidden_size == 128
    del raw["mlp_hidden_size"]
    assert LLaDAConfig.from_dict(raw).mlp_hidden_size == 192


def test_rope_is_half_rotation_in_float32():
    hd, theta = 8, 500000.0
    cos, sin = rotary_tables(5, hd, theta, torch.device("cpu"))
    t = torch.randn(1, 1, 5, hd)
    got = apply_rotary(t, cos, sin, full_precision=True)
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    want = np.empty((5, hd))
    x = t[0, 0].double().numpy()
    for p in range(5):
        ang = np.concatenate([p * inv, p * inv])
        rot = np.concatenate([-x[p, hd // 2:], x[p, :hd // 2]])
        want[p] = x[p] * np.cos(ang) + rot * np.sin(ang)
    np.testing.assert_allclose(got[0, 0].numpy(), want, atol=1e-5)
    half = apply_rotary(t.half(), cos, sin, full_precision=True)
    assert half.dtype == torch.float16


def test_shapes_and_peaked_logits():
    model = make_tiny_model()
    ids = torch.randint(0, 100, (2, 7))
    logits = model(ids)
    assert logits.shape == (2, 7, 126464)
    assert logits.std() > 2.0  # decisive: logit spread of several units
    positions = torch.tensor([[0, 3], [6, 6]])
    torch.testing.assert_close(model(ids, positions=positions),
                               torch.stack([logits[0, [0, 3]], logits[1, [6, 6]]]))


def test_bidirectional():
    model = make_tiny_model()
    ids = torch.randint(0, 100, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 100
    assert not torch.allclose(model(ids)[0, 0], model(changed)[0, 0])


@pytest.mark.parametrize("kwargs", [{}, {"n_kv_heads": 2}, {"weight_tying": True}])
def test_left_padding_matches_unpadded_row(kwargs):
    model = make_tiny_model(**kwargs)
    ids = torch.randint(0, 100, (1, 6))
    pad = torch.full((1, 3), model.config.pad_token_id)
    padded = torch.cat([pad, ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        a = model(padded, mask)[0, 3:]
        unpadded = model(ids)[0]
    # RoPE scores depend only on relative positions, so the shift by the pads changes nothing but rounding of
    # the angles: equal within 1e-5 of the logit scale (std ~4 here) in float32.
    torch.testing.assert_close(a, unpadded, atol=1e-5 * float(unpadded.std()), rtol=0)
    # Same positions, different junk in the masked slots: identical up to summation order.
    junk = torch.cat([torch.randint(100, 200, (1, 3)), ids], dim=1)
    torch.testing.assert_close(model(junk, mask)[0, 3:], a, atol=1e-5, rtol=0)
    # The mask matters: without it the pads would be attended to.
    assert not torch.allclose(model(padded)[0, 3:], a, atol=1e-3)


def test_all_ones_mask_runs_unmasked():
    model = make_tiny_model()
    ids = torch.randint(0, 100, (2, 5))
    torch.testing.assert_close(model(ids, torch.ones_like(ids)), model(ids), atol=0, rtol=0)


def test_gqa_repeats_kv_heads_interleaved():
    model = make_tiny_model(n_heads=4, n_kv_heads=2)
    blk = model.model.transformer.blocks[0]
    assert blk.k_proj.weight.shape == (32, 64) and blk.q_proj.weight.shape == (64, 64)
    # Equivalent full-head model: duplicate each kv head's rows consecutively (repeat_interleave).
    full = make_tiny_model(n_heads=4)
    full.load_state_dict({k: v for k, v in model.state_dict().items() if "k_proj" not in k and "v_proj" not in k},
                         strict=False)
    for a, b in zip(full.model.transformer.blocks, model.model.transformer.blocks):
        for name in ("k_proj", "v_proj"):
            w = getattr(b, name).weight.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
            getattr(a, name).weight.data.copy_(w)
    ids = torch.randint(0, 100, (1, 6))
    torch.testing.assert_close(full(ids), model(ids), atol=1e-4, rtol=1e-4)


def test_tied_has_no_separate_head(tmp_path):
    ids = {"mask_token_id": 5, "eos_token_id": 6, "pad_token_id": 6, "bos_token_id": 7, "eot_token_id": 9}
    make_tiny_checkpoint(tmp_path, weight_tying=True, d_model=32, n_heads=2, n_layers=1, vocab_size=300, ids=ids)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.transformer.ff_out.weight" not in names and "model.transformer.wte.weight" in names
    assert LLaDAModel.from_pretrained(tmp_path).config.weight_tying


def test_official_tensor_names(tiny_ckpt):
    from safetensors import safe_open
    with safe_open(str(tiny_ckpt / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    index = json.loads((REFERENCE / "model.safetensors.index.json").read_text())["weight_map"]
    for i in range(2):
        for part in ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"):
            assert f"model.transformer.blocks.{i}.{part}.weight" in names
    assert names <= set(index)  # every name we write exists in the real 8B checkpoint


def test_loads_single_file_and_sharded_identically(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "one")
    tiny_model.save_pretrained(tmp_path / "many", max_shard_bytes=10_000_000)
    assert (tmp_path / "many" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "many").glob("model-*-of-*.safetensors"))) > 1
    a, b = LLaDAModel.from_pretrained(tmp_path / "one"), LLaDAModel.from_pretrained(tmp_path / "many")
    ids = torch.randint(0, 100, (1, 5))
    torch.testing.assert_close(a(ids), b(ids), atol=0, rtol=0)
    assert LLaDAModel.from_pretrained(tmp_path / "one", dtype=torch.bfloat16).model.transformer.wte.weight.dtype \
        == torch.bfloat16


def test_load_errors(tmp_path, tiny_ckpt):
    with pytest.raises(FileNotFoundError, match="not found"):
        LLaDAModel.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLaDAModel.from_pretrained(tmp_path / "empty")
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    (ck / "model.safetensors").rename(ck / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled"):
        LLaDAModel.from_pretrained(ck)
    with pytest.raises(ValueError, match="dtype"):
        LLaDAModel.from_pretrained(tiny_ckpt, dtype=torch.int8)


def _edit_tensors(src, dst, edit):
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_missing_unexpected_and_misshaped_tensors(tmp_path, tiny_ckpt):
    name = "model.transformer.blocks.1.q_proj.weight"
    ck = _edit_tensors(tiny_ckpt, tmp_path / "a", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match="missing.*q_proj"):
        LLaDAModel.from_pretrained(ck)
    ck = _edit_tensors(tiny_ckpt, tmp_path / "b", lambda t: t.__setitem__("model.transformer.extra", torch.zeros(1)))
    with pytest.raises(CheckpointError, match="unexpected.*extra"):
        LLaDAModel.from_pretrained(ck)
    ck = _edit_tensors(tiny_ckpt, tmp_path / "c", lambda t: t.__setitem__(name, torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=r"q_proj.*\[3, 3\].*\[64, 64\]"):
        LLaDAModel.from_pretrained(ck)


def test_fused_projections_compute_the_same_model():
    """The exporter joins q/k/v and gate/up into one matrix each: the same function, other parameter names."""
    model = make_tiny_model(n_heads=4, n_kv_heads=2)
    ids = torch.randint(0, 100, (2, 7))
    want = model(ids)
    fused = copy.deepcopy(model).fuse_projections()
    block = fused.model.transformer.blocks[0]
    assert block.fused and not hasattr(block, "q_proj") and block.qkv_proj.weight.shape == (64 + 2 * 32, 64)
    torch.testing.assert_close(fused(ids), want, rtol=1e-5, atol=1e-5)
