"""Session-wide tiny checkpoints in the official layout, each exported once (a dynamo export takes seconds)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from llada_onnx.models import LLaDAModel, make_tiny_model
from llada_onnx.models.tiny import LLADA_CHAT_TEMPLATE as TEMPLATE, write_tiny_tokenizer_files


def favour_stop_tokens(model: LLaDAModel, seed: int = 0) -> LLaDAModel:
    """Point the EOS and EoT head rows at the average masked-position state, so the model often predicts them.

    A random model picks EOS/EoT about once in 126k; the EOS/EoT options of the sampler need them to compete.
    """
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    canvas = torch.randint(0, 200, (4, 24), generator=gen)
    canvas[:, 8:] = cfg.mask_token_id
    with torch.no_grad():
        h = model.hidden_states(canvas)[:, 8:].reshape(-1, cfg.d_model)
        logits = model.lm_head(h)
        target = logits.max(-1).values.quantile(0.6)  # each wins at a good share of masked positions
        head = model.model.transformer.wte.weight if cfg.weight_tying else model.model.transformer.ff_out.weight
        early, late = h.reshape(4, 16, -1)[:, :8].reshape(-1, cfg.d_model), h.reshape(4, 16, -1)[:, 8:].reshape(-1, cfg.d_model)
        for token, states in ((cfg.eos_token_id, early), (cfg.eot_token_id, late)):
            direction = states.mean(0) - 0.5 * h.mean(0)
            head[token] = direction / (direction @ states.mean(0)) * target
    return model


def _write(tmp_path_factory, name: str, model: LLaDAModel, **save_kwargs):
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path, **save_kwargs)
    write_tiny_tokenizer_files(path, model.config, chat_template=TEMPLATE)
    return path


@pytest.fixture(scope="session")
def tiny_model() -> LLaDAModel:
    return favour_stop_tokens(make_tiny_model(n_layers=2, d_model=64, n_heads=4, seed=1))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_model):
    return _write(tmp_path_factory, "tiny", tiny_model)


@pytest.fixture(scope="session")
def gqa_sharded_ckpt(tmp_path_factory):
    model = make_tiny_model(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, seed=2)
    return _write(tmp_path_factory, "gqa", model, max_shard_bytes=20_000_000)


@pytest.fixture(scope="session")
def tied_ckpt(tmp_path_factory):
    model = make_tiny_model(n_layers=1, d_model=64, n_heads=2, weight_tying=True, seed=3)
    return _write(tmp_path_factory, "tied", model)


def _export(tmp_path_factory, ckpt, name, **options):
    from llada_onnx.export import export

    out = tmp_path_factory.mktemp("exports") / name
    export(ckpt, out, progress=False, **options)
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_ckpt):
    return _export(tmp_path_factory, tiny_ckpt, "tiny")


@pytest.fixture(scope="session")
def gqa_sharded_onnx(tmp_path_factory, gqa_sharded_ckpt):
    return _export(tmp_path_factory, gqa_sharded_ckpt, "gqa")


@pytest.fixture(scope="session")
def tied_onnx(tmp_path_factory, tied_ckpt):
    return _export(tmp_path_factory, tied_ckpt, "tied")


@pytest.fixture(scope="session")
def tiny_fused_onnx(tmp_path_factory, tiny_ckpt):
    return _export(tmp_path_factory, tiny_ckpt, "tiny-fused", fusion="ort")


@pytest.fixture(scope="session")
def gqa_fused_onnx(tmp_path_factory, gqa_sharded_ckpt):
    return _export(tmp_path_factory, gqa_sharded_ckpt, "gqa-fused", fusion="ort", cache=True)


@pytest.fixture(scope="session")
def tiny_cache_onnx(tmp_path_factory, tiny_ckpt):
    return _export(tmp_path_factory, tiny_ckpt, "tiny-cache", cache=True)


@pytest.fixture(scope="session")
def pipeline(tiny_onnx):
    from llada_onnx.runtime import Pipeline

    return Pipeline.from_pretrained(tiny_onnx)


@pytest.fixture(scope="session")
def loaded_tiny(tiny_ckpt) -> LLaDAModel:
    """The tiny checkpoint as the torch reference loads it from disk."""
    return LLaDAModel.from_pretrained(tiny_ckpt)


def dequantized_experts(weight: np.ndarray, method: str, block_size: int) -> np.ndarray:
    """Expert weights ``[E, out, in]`` as the CPU ``QMoE`` kernel sees them after ``quantize_experts``: quantized,
    then multiplied back by their (fp16) scales."""
    from llada_onnx.export.quantize_experts import quantize_int4, quantize_int8

    if method == "int8":
        q, scales = quantize_int8(weight)
        return (q.astype(np.float32) - 128) * scales.astype(np.float32)[..., None]
    packed, scales = quantize_int4(weight, block_size)
    q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(weight.shape).astype(np.float32) - 8
    blocks = q.reshape(*weight.shape[:2], -1, block_size) * scales.astype(np.float32)[..., None]
    return blocks.reshape(weight.shape)


def graph_ops(graph) -> Counter:
    """How often each op type appears in the ONNX graph at ``graph`` (its weights not loaded)."""
    return Counter(n.op_type for n in onnx.load(str(graph), load_external_data=False).graph.node)


def prompts(batch: int, lengths=(6, 9, 4), seed: int = 0, pad_id: int = 126081):
    """A left-padded prompt batch of ordinary token ids (as numpy)."""
    rng = np.random.default_rng(seed)
    lens = [lengths[i % len(lengths)] for i in range(batch)]
    width = max(lens)
    ids = np.full((batch, width), pad_id, dtype=np.int64)
    mask = np.zeros((batch, width), dtype=np.int64)
    for i, n in enumerate(lens):
        ids[i, width - n:] = rng.integers(0, 120, size=n)
        mask[i, width - n:] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------- LLaDA-MoE
@pytest.fixture(scope="session")
def moe_ckpt(tmp_path_factory):
    from llada_onnx.models.tiny import make_tiny_moe_checkpoint

    return make_tiny_moe_checkpoint(tmp_path_factory.mktemp("moe") / "ckpt", max_shard_bytes=40_000_000, seed=1)


@pytest.fixture(scope="session")
def moe_model(moe_ckpt):
    from llada_onnx.models.llada_moe import LLaDAMoEModel

    return LLaDAMoEModel.from_pretrained(moe_ckpt)


@pytest.fixture(scope="session")
def moe_fused(tmp_path_factory, moe_ckpt):
    return _export(tmp_path_factory, moe_ckpt, "moe-fused", cache=True)


@pytest.fixture(scope="session")
def moe_decomposed(tmp_path_factory, moe_ckpt):
    return _export(tmp_path_factory, moe_ckpt, "moe-decomposed", moe="decomposed")

