"""The default model's recipe: corpus preparation, the LLaDA objective, resumable training, the written checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llada_onnx.models import LLaDAConfig, LLaDAModel
from llada_onnx.models.corpus import HELDOUT, prepare
from llada_onnx.models.train import Recipe, Trainer, diffusion_loss, forward_process, main, masked_token_loss

LINES = ["Enter ROMEO and JULIET.", "ROMEO. But soft, what light through yonder window breaks?",
         "JULIET. O Romeo, Romeo, wherefore art thou Romeo?", "KING. What say you, my lord, to this?",
         "HAMLET. To be, or not to be, that is the question."]
RECIPE = dict(d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=64, max_sequence_length=64, seq_len=32,
              batch_size=4, warmup_steps=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    texts = tmp_path_factory.mktemp("texts")
    for i, name in enumerate(("a_gut.txt", "b_gut.txt", "c_gut.txt") + HELDOUT):
        (texts / name).write_text("\n\n".join(LINES[i % 5:] + LINES[:i % 5]) * 20)
    (texts / "a_gut_f.txt").write_text("First Folio copy: never read")
    out = tmp_path_factory.mktemp("data")
    prepare(texts, out, vocab_size=320)
    return out


def test_prepare_puts_llada_specials_after_the_bpe_tokens(data_dir):
    info = json.loads((data_dir / "corpus.json").read_text())
    assert sorted(info["train_files"]) == ["a_gut.txt", "b_gut.txt", "c_gut.txt"]
    assert sorted(info["heldout_files"]) == sorted(HELDOUT)
    assert info["special_ids"] == {"bos_token_id": 304, "eos_token_id": 305, "pad_token_id": 305,
                                   "mask_token_id": 306, "eot_token_id": 309}
    train = np.load(data_dir / "train.npy")
    assert train.dtype == np.uint16 and (train == 305).sum() == 3 and train.max() == 305


def test_forward_process_and_loss_follow_the_guidelines():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (64, 256), generator=gen)
    noisy, masked, p_mask = forward_process(ids, 99, 1e-3, gen)
    assert torch.equal(noisy == 99, masked) and torch.equal(noisy[~masked], ids[~masked])
    assert (p_mask >= 1e-3).all() and torch.equal(p_mask, p_mask[:, :1].expand_as(p_mask))
    rate = masked.float().mean(1)
    assert (rate - p_mask[:, 0]).abs().max() < 0.15  # each row masks about t of its tokens

    class Uniform(torch.nn.Module):  # logits 0 everywhere: cross-entropy is log(V) per masked token
        def forward(self, x):
            return torch.zeros(*x.shape, 100)
    loss = diffusion_loss(Uniform(), ids, noisy, masked, p_mask)
    want = (np.log(100) / p_mask[masked]).sum() / ids.numel()
    assert torch.allclose(loss, want)


def test_resumed_training_equals_an_uninterrupted_run(data_dir):
    recipe = Recipe(**RECIPE)
    straight = Trainer(data_dir, recipe, torch.device("cpu"))
    straight.max_steps = 6
    for _ in range(6):
        straight.train_step()
    first = Trainer(data_dir, recipe, torch.device("cpu"))
    first.max_steps = 6
    for _ in range(3):
        first.train_step()
    state = first.state()
    resumed = Trainer(data_dir, recipe, torch.device("cpu"))
    resumed.load_state(state)
    for _ in range(3):
        resumed.train_step()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_training_cli_writes_a_loadable_checkpoint(data_dir, tmp_path):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in RECIPE.items()]
    assert main([str(data_dir), str(tmp_path), "--max-steps", "4", "--eval-every", "2", *flags]) == 0
    ckpt = tmp_path / "checkpoint"
    cfg = LLaDAConfig.from_pretrained(ckpt)
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.eot_token_id, cfg.bos_token_id) == (306, 305, 309, 304)
    assert json.loads((ckpt / "config.json").read_text())["torch_dtype"] == "bfloat16"
    summary = json.loads((tmp_path / "training.json").read_text())
    assert summary["steps"] == 4 and [e["step"] for e in summary["evals"]] == [2, 4]
    model = LLaDAModel.from_pretrained(ckpt)
    heldout = np.load(data_dir / "heldout.npy")
    again = masked_token_loss(model, heldout, 32, cfg.mask_token_id)
    assert again["masked_token_loss"] == pytest.approx(summary["heldout"]["masked_token_loss"], rel=1e-5)
    assert main([str(data_dir), str(tmp_path / "other"), "--resume", *flags]) == 2  # nothing to resume


def test_masked_token_loss_scores_an_onnx_session_like_torch():
    """The evaluator takes a function from noisy ids to logits too: the shipped fp32 export scores as its checkpoint."""
    import onnxruntime as ort

    from llada_onnx.runtime import default_checkpoint_dir, default_onnx_dir

    model = LLaDAModel.from_pretrained(default_checkpoint_dir()).float()
    session = ort.InferenceSession(str(default_onnx_dir() / "model.onnx"), providers=["CPUExecutionProvider"])

    def logits(ids):
        every = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
        return session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids), "positions": every})[0]

    tokens = np.random.default_rng(0).integers(0, 4080, size=4 * 64)
    mask_id = model.config.mask_token_id
    a = masked_token_loss(model, tokens, 64, mask_id, batch_size=2)
    b = masked_token_loss(logits, tokens, 64, mask_id, batch_size=2)
    assert a["masked_tokens"] == b["masked_tokens"] > 0
    assert b["masked_token_loss"] == pytest.approx(a["masked_token_loss"], rel=1e-4)
