"""The embedded default model: loads without a path, generates, matches torch, and matches its own checkpoint."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from llada_onnx.export import export
from llada_onnx.models import LLaDAConfig, LLaDAModel, generate
from llada_onnx.models.config import OFFICIAL_IDS
from llada_onnx.runtime import Pipeline, default_checkpoint_dir, default_onnx_dir

PROMPTS = ["ROMEO.\n", "KING.\nWhat say you, my lord?", "To be, or not to be"]
SETTINGS = dict(gen_length=64, steps=64, block_length=32)


@pytest.fixture(scope="module")
def default_pipe() -> Pipeline:
    return Pipeline.from_pretrained()


@pytest.fixture(scope="module")
def encoded(default_pipe):
    return default_pipe.codec.encode_batch(PROMPTS, chat=False)


def test_default_model_is_a_base_model_with_its_own_ids(default_pipe):
    manifest = default_pipe.manifest
    assert manifest.directory == default_onnx_dir()
    assert manifest.chat_template is None and not default_pipe.codec.has_chat_template
    cfg = LLaDAConfig.from_pretrained(default_checkpoint_dir())
    assert manifest.ids == {k: getattr(cfg, k) for k in manifest.ids}
    assert all(manifest.ids[k] != OFFICIAL_IDS[k] for k in manifest.ids)  # nothing may assume the 8B ids
    tok = default_pipe.codec.tokenizer
    for text, field in (("<|mdm_mask|>", "mask_token_id"), ("<|endoftext|>", "eos_token_id"),
                        ("<|eot_id|>", "eot_token_id"), ("<|startoftext|>", "bos_token_id")):
        assert tok.token_to_id(text) == manifest.id(field)


def test_default_model_fits_the_size_budget():
    total = sum(p.stat().st_size for p in default_onnx_dir().parent.rglob("*") if p.is_file())
    assert total < 30_000_000, f"the embedded model is {total / 1e6:.1f} MB"


def test_default_model_writes_text(default_pipe):
    texts = default_pipe.generate(PROMPTS[:2], **SETTINGS)  # chat=None -> raw for a base model
    for text in texts:
        words = text.split()
        assert len(words) > 10
        assert sum(w.strip(".,;:!?'-").isalpha() for w in words) > 0.8 * len(words)


def test_default_model_is_token_exact_with_torch(default_pipe, encoded):
    ids, mask = encoded
    model = LLaDAModel.from_pretrained(default_checkpoint_dir())
    want = generate(model, torch.from_numpy(ids), torch.from_numpy(mask), **SETTINGS).numpy()
    np.testing.assert_array_equal(default_pipe.generate_ids(ids, mask, **SETTINGS), want)


def test_reexported_checkpoint_matches_the_shipped_onnx(default_pipe, encoded, tmp_path_factory):
    out = tmp_path_factory.mktemp("reexport") / "onnx"
    export(default_checkpoint_dir(), out, validate=False, progress=False)
    fresh = Pipeline.from_pretrained(out)
    ids, mask = encoded
    np.testing.assert_array_equal(fresh.generate_ids(ids, mask, **SETTINGS),
                                  default_pipe.generate_ids(ids, mask, **SETTINGS))
    positions = np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1))
    a = fresh.graph.run(ids, mask, positions, logits=True).logits
    b = default_pipe.graph.run(ids, mask, positions, logits=True).logits
    assert np.abs(a - b).max() < 1e-4 * b.std()


def test_cli_generate_uses_the_default_model():
    res = subprocess.run([sys.executable, "-m", "llada_onnx.cli", "generate", "--prompt", "ROMEO.",
                          "--gen-length", "16", "--steps", "16", "--block-length", "16"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.split()) > 3
    chat = subprocess.run([sys.executable, "-m", "llada_onnx.cli", "chat"], input="hello\n",
                          capture_output=True, text=True, timeout=300)
    assert chat.returncode == 2 and "Traceback" not in chat.stderr
    assert "needs --model" in chat.stderr and "base model without a chat template" in chat.stderr
    help_text = subprocess.run([sys.executable, "-m", "llada_onnx.cli", "chat", "--help"], capture_output=True,
                               text=True, timeout=300).stdout
    assert "the embedded default model is a base model" in " ".join(help_text.split())
