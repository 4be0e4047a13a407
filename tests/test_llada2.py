"""LLaDA2 (``LLaDA2MoeModelLM``): config, routing, block-diffusion attention and the torch block sampler."""

from __future__ import annotations

import dataclasses
import json
import math

import onnx
import pytest
import torch

from llada_onnx.models.block_sampler import answer_ids, generate
from llada_onnx.runtime.block_settings import BlockSettings
from llada_onnx.models.config import UnsupportedConfigError
from llada_onnx.models.llada2 import LLaDA2Config, LLaDA2Model, block_bias
from llada_onnx.models.moe import grouped_routing
from llada_onnx.models.tiny import make_tiny_llada2_checkpoint

from conftest import dequantized_experts

MASK, EOS = 156895, 156892
# the real mini config's values (shared/reference/llada2-mini/config.json)
MINI = {"architectures": ["LLaDA2MoeModelLM"], "hidden_size": 2048, "num_hidden_layers": 20,
        "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 157184,
        "intermediate_size": 5120, "moe_intermediate_size": 512, "num_experts": 256, "num_experts_per_tok": 8,
        "n_group": 8, "topk_group": 4, "num_shared_experts": 1, "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1, "partial_rotary_factor": 0.5, "rope_theta": 600000, "rms_norm_eps": 1e-6,
        "score_function": "sigmoid", "moe_router_enable_expert_bias": True, "norm_topk_prob": True,
        "use_bias": False, "use_qkv_bias": False, "tie_word_embeddings": False, "rope_scaling": None,
        "pad_token_id": 156892, "max_position_embeddings": 16384, "hidden_act": "silu"}


@pytest.fixture(scope="module")
def llada2(tmp_path_factory):
    return LLaDA2Model.from_pretrained(make_tiny_llada2_checkpoint(tmp_path_factory.mktemp("llada2")))


def test_config_reads_the_real_fields_and_refuses_what_is_not_implemented():
    cfg = LLaDA2Config.from_dict(MINI)
    assert (cfg.rotary_dim, cfg.mask_token_id, cfg.eos_token_id, cfg.head_dim) == (64, MASK, EOS, 128)
    from llada_onnx.models.llada2 import parameter_count

    assert 16.0e9 < parameter_count(cfg) < 16.5e9  # "~16.25B total"
    for field, value in (("score_function", "softmax"), ("use_qkv_bias", True), ("rope_scaling", {"type": "x"})):
        with pytest.raises(UnsupportedConfigError, match=field):
            LLaDA2Config.from_dict(dict(MINI, **{field: value}))


def test_routing_on_a_hand_checked_example():
    """8 experts in 4 groups of 2, 2 groups kept, top-2, scale 2.5. The expert bias and the group limit both change
    the choice: without them experts 0 and 5 (the best raw scores) would win."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.4, -2.0, 1.5, 0.0, -0.5]])
    bias = torch.tensor([0, 0, 0, 0.5, 0, 0, 0.6, 0])
    experts, weights = grouped_routing(logits, bias, k=2, n_group=4, topk_group=2, scale=2.5)
    # selection = sigmoid + bias = [.881 .269 | .622 1.099 | .119 .818 | 1.1 .378]; group sums of the best two:
    # 1.150, 1.721, 0.937, 1.478 -> groups 1 and 3 -> experts 6 (1.1) and 3 (1.099)
    got = dict(zip(experts[0].tolist(), weights[0].tolist()))
    s3, s6 = 1 / (1 + math.exp(-0.4)), 0.5  # the unbiased scores mix
    assert set(got) == {3, 6}
    assert got[3] == pytest.approx(2.5 * s3 / (s3 + s6), abs=1e-6)
    assert got[6] == pytest.approx(2.5 * s6 / (s3 + s6), abs=1e-6)


def test_block_diffusion_mask_counts_each_rows_own_tokens():
    bias = block_bias(torch.tensor([[0, 1, 1, 1, 1]]), torch.zeros(1, 0), block_length=2, dtype=torch.float32)[0, 0]
    seen = (bias == 0).int().tolist()
    # tokens at 1..4 are blocks 0, 0, 1, 1; the pad (column 0) is never seen (and, as a query, sees nothing)
    assert seen == [[0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 1, 1, 1, 1]]


def test_a_left_padded_row_computes_what_it_computes_alone(llada2):
    ids = torch.randint(0, 1000, (1, 13))
    alone = llada2(ids, block_length=4)
    padded = llada2(torch.cat([torch.full((1, 3), EOS), ids], dim=1), torch.tensor([[0] * 3 + [1] * 13]),
                    block_length=4)
    torch.testing.assert_close(padded[:, 3:], alone, atol=1e-4, rtol=0)  # float sums over more keys


def test_finished_blocks_cached_give_the_full_forward(llada2):
    """The exact block cache in torch: the keys/values of whole finished blocks as a past, the rest fed."""
    mask = torch.tensor([[0, 0, 0] + [1] * 13])  # a padded row: its blocks of 4 start at canvas 3
    ids = torch.randint(0, 1000, mask.shape)
    full = llada2.hidden_states(ids, mask, 4)[0]
    h, past = llada2.hidden_states(ids[:, :11], mask[:, :11], 4)  # the pads and two blocks
    cached, _ = llada2.hidden_states(ids[:, 11:], mask[:, 11:], 4, past, mask[:, :11])
    torch.testing.assert_close(cached, full[:, 11:], atol=1e-5, rtol=0)
    torch.testing.assert_close(h[:, 3:], full[:, 3:11], atol=1e-5, rtol=0)  # a pad's own output is noise


def test_blocks_are_causal(llada2):
    """Changing a later block never changes an earlier block's logits."""
    ids = torch.randint(0, 1000, (1, 16))
    changed = ids.clone()
    changed[0, 12:] = 7
    a, b = llada2(ids, block_length=4), llada2(changed, block_length=4)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("prompt_len", [8, 11])  # divides the block of 8, and does not
@pytest.mark.parametrize("threshold", [0.5, 0.95, 1.0])
def test_sampler_fills_blocks_in_order_and_batches_like_single_rows(llada2, prompt_len, threshold):
    s = BlockSettings(gen_length=24, block_length=8, steps=4, threshold=threshold)
    rows = [torch.randint(0, 1000, (n,)) for n in (prompt_len, prompt_len - 3)]
    width = max(len(r) for r in rows)
    batch = torch.stack([torch.cat([torch.full((width - len(r),), EOS), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]) for r in rows]).long()
    together = generate(llada2, batch, mask, settings=s, mask_id=MASK, eos_id=EOS, pad_id=EOS)
    for i, row in enumerate(rows):
        alone = generate(llada2, row[None], settings=s, mask_id=MASK, eos_id=EOS, pad_id=EOS)
        pad = width - len(row)
        length = alone.shape[1]
        assert torch.equal(together[i, pad:pad + length], alone[0])
        gen = alone[0, len(row):len(row) + s.gen_length]
        if not (gen == EOS).any():  # no EOS: every generated position was filled
            assert (gen != MASK).all()
        assert answer_ids(alone[0], len(row), s.gen_length, EOS).numel() <= s.gen_length


class _Scripted(torch.nn.Module):
    """A stand-in model: at canvas position p it predicts token ``100 + p`` with probability ``probs[p]`` (the rest
    spread evenly), or, where ``after`` says so, a different token once p is committed (to exercise editing)."""

    def __init__(self, probs: dict[int, float], vocab: int = 160000, edit_at: int | None = None):
        super().__init__()
        self.probs, self.vocab, self.edit_at = probs, vocab, edit_at

    def forward(self, ids, mask, block_length):
        b, n = ids.shape
        logits = torch.zeros(b, n, self.vocab)
        for p in range(n):
            prob = self.probs.get(p, 0.5)
            token = 100 + p
            if self.edit_at == p and ids[0, p] != MASK:
                token, prob = 50, 0.9
            rest = (1 - prob) / (self.vocab - 1)
            logits[:, p] = math.log(rest)
            logits[:, p, token] = math.log(prob)
        return logits


def test_threshold_commits_what_passes_else_the_schedules_count():
    prompt = torch.arange(1, 5)[None]  # 4 tokens, block 4: generation starts at the next block
    probs = {4: 0.99, 5: 0.2, 6: 0.97, 7: 0.3}
    steps = []
    model = _Scripted(probs)
    original = model.forward

    def spy(ids, mask, block_length):
        steps.append((ids[0, 4:8] != MASK).sum().item())
        return original(ids, mask, block_length)

    model.forward = spy
    s = BlockSettings(gen_length=4, block_length=4, steps=4, threshold=0.95)
    out = generate(model, prompt, settings=s, mask_id=MASK, eos_id=EOS, pad_id=EOS)
    assert out[0, 4:8].tolist() == [104, 105, 106, 107]
    # step 1: positions 4 and 6 pass 0.95 (2 >= the schedule's 1); step 2: none passes, the schedule's 1 (7 > 5)
    assert steps == [0, 2, 3]


def test_editing_replaces_a_committed_token_and_post_steps_end_when_nothing_changes():
    prompt = torch.arange(1, 5)[None]
    s = BlockSettings(gen_length=4, block_length=4, steps=4, threshold=0.95, editing_threshold=0.8,
                      max_post_steps=4)
    model = _Scripted({4: 0.99, 5: 0.99, 6: 0.99, 7: 0.99}, edit_at=5)
    edited = generate(model, prompt, settings=s, mask_id=MASK, eos_id=EOS, pad_id=EOS)
    plain = generate(model, prompt, settings=BlockSettings(gen_length=4, block_length=4, steps=4),
                     mask_id=MASK, eos_id=EOS, pad_id=EOS)
    assert plain[0, 4:8].tolist() == [104, 105, 106, 107]
    assert edited[0, 4:8].tolist() == [104, 50, 106, 107]


def test_eos_ends_the_generation_after_its_block():
    prompt = torch.arange(1, 5)[None]

    class EosAt6(_Scripted):
        def forward(self, ids, mask, block_length):
            logits = super().forward(ids, mask, block_length)
            logits[:, 6] = -30.0
            logits[:, 6, EOS] = 0.0
            return logits

    s = BlockSettings(gen_length=12, block_length=4, steps=4, threshold=0.9)
    out = generate(EosAt6({p: 0.99 for p in range(20)}), prompt, settings=s, mask_id=MASK, eos_id=EOS, pad_id=EOS)
    assert out[0, 4:8].tolist() == [104, 105, EOS, 107]
    assert (out[0, 8:] == MASK).all()  # later blocks never ran
    assert answer_ids(out[0], 4, 12, EOS).tolist() == [104, 105, EOS]


def _routed_experts(llada2, fc1=None, fc2=None):
    """Layer 1's routed experts of the tiny model as a module: router in float32, then the grouped-routing op."""
    from llada_onnx.models.moe import moe_grouped_swiglu

    moe, c = llada2.model.layers[1].mlp, llada2.config
    stacked = [w.detach().clone() for w in moe.stacked()]

    class Routed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.bias = moe.gate.weight.detach(), moe.gate.expert_bias.detach()
            self.fc1 = stacked[0] if fc1 is None else fc1
            self.fc2 = stacked[1] if fc2 is None else fc2

        def forward(self, x):
            logits = torch.nn.functional.linear(x.float(), self.gate.float())
            return moe_grouped_swiglu(x, logits, self.bias, self.fc1, self.fc2, c.num_experts_per_tok, c.n_group,
                                      c.topk_group, c.routed_scaling_factor)

    return Routed().eval()


def _export_routed(module, path, form: str, hidden: int):
    from llada_onnx.export.moe import translation_table

    x = torch.randn(64, hidden)
    torch.onnx.export(module, (x,), str(path), dynamo=True, opset_version=20, input_names=["x"], output_names=["y"],
                      dynamic_shapes={"x": {0: torch.export.Dim("tokens")}},
                      custom_translation_table=translation_table(form))
    return x


@pytest.mark.parametrize("form", ["fused", "decomposed"])
def test_the_routed_experts_in_onnx_match_torch(tmp_path, llada2, form):
    """The grouped-routing expert op written as onnxruntime's MoE kernel (routing in standard ops in front) and in
    standard ops alone: the same output as the eager op on a layer of the tiny model, at 64 tokens."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    routed = _routed_experts(llada2)
    x = _export_routed(routed, tmp_path / "moe.onnx", form, llada2.config.hidden_size)
    want = routed(x)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "moe.onnx")).graph.node}
    assert ("MoE" in ops) == (form == "fused")
    got = ort.InferenceSession(str(tmp_path / "moe.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5 * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_quantized_routed_experts_are_the_dequantized_ones(tmp_path, llada2, method):
    """The fused graph's MoE node rewritten as QMoE (whose router_weights are the softmax of the log-scores it is fed:
    the renormalised sigmoid scores) computes the eager op over the dequantized expert weights."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from llada_onnx.export.quantize_experts import quantize_experts

    routed = _routed_experts(llada2)
    x = _export_routed(routed, tmp_path / "moe.onnx", "fused", llada2.config.hidden_size)
    model = onnx.load(str(tmp_path / "moe.onnx"))
    assert quantize_experts(model, tmp_path, method, 16) == 1
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]

    want = _routed_experts(llada2, *(torch.from_numpy(dequantized_experts(w.numpy(), method, 16))
                                     for w in (routed.fc1, routed.fc2)))(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max(), rtol=0)


@pytest.fixture(scope="module")
def llada2_ckpt(tmp_path_factory):
    return make_tiny_llada2_checkpoint(tmp_path_factory.mktemp("llada2-ckpt"))


@pytest.mark.parametrize("form", ["fused", "decomposed"])
def test_export_takes_the_block_length_as_an_input(tmp_path, llada2_ckpt, form):
    """One export serves every block size: the graph's logits match torch's at block lengths 4 and 16, on a batch with
    a left-padded row; the export validates (fp32 against torch, the full forward and the block cache);
    Pipeline.forward_logits takes the block length."""
    import json

    import numpy as np
    import onnxruntime as ort

    from llada_onnx.export import export
    from llada_onnx.runtime import NotAnExportError, Pipeline

    out = tmp_path / form
    report = export(llada2_ckpt, out, moe=form, progress=False).validation
    assert report["finite"] and report["top_ids_decisive_disagreements"] == 0
    assert report["block_cache"]["cached_max_abs_diff"] < report["block_cache"]["tolerance"]
    manifest = json.loads((out / "llada_onnx.json").read_text())
    assert manifest["graphs"] == {"block_forward": "model.onnx"} and manifest["sampler"] == "block_diffusion"
    assert manifest["special_ids"]["mask_token_id"] == MASK
    model = LLaDA2Model.from_pretrained(llada2_ckpt)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 1000, (2, 21))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    positions = torch.arange(21).expand(2, 21).contiguous()
    empty = np.zeros((2, model.config.num_key_value_heads, 0, model.config.head_dim), dtype=np.float32)
    past = {i.name: empty for i in session.get_inputs() if i.name.startswith("past_")}
    past["cached_mask"] = np.zeros((2, 0), dtype=np.int64)
    for block in (4, 16):
        got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                       "positions": positions.numpy(),
                                       "block_length": np.array(block, dtype=np.int64), **past})[0]
        with torch.no_grad():
            want = model(ids, mask, positions, block_length=block).numpy()
        np.testing.assert_allclose(got[mask.bool().numpy()], want[mask.bool().numpy()], atol=1e-4 * float(
            np.abs(want).std()) + 1e-5, rtol=0)
    older = json.dumps(dict(manifest, format_version=2))  # block_forward took no past before format 3
    (out / "llada_onnx.json").write_text(older)
    with pytest.raises(NotAnExportError, match=r"format_version 2 is not supported .* \(expects 3..3\); re-export"):
        Pipeline.from_pretrained(out)
    (out / "llada_onnx.json").write_text(json.dumps(manifest))
    pipe = Pipeline.from_pretrained(out)
    np.testing.assert_allclose(pipe.forward_logits(ids.numpy(), mask.numpy(), block_length=4)[mask.bool().numpy()],
                               model(ids, mask, block_length=4).detach().numpy()[mask.bool().numpy()], atol=1e-4)


def test_half_precision_experts_are_judged_against_torchs_own_half_precision_error(tmp_path, llada2_ckpt):
    """An fp16 graph of an expert model is held to the larger of 1% of the logit scale and twice the error torch
    itself makes in fp16 (measured from the model being exported). The decomposed experts run in fp16 on the CPU."""
    from llada_onnx.export import export
    from llada_onnx.export.validate import FP16_EXPERTS_MEAN_RELATIVE_ERROR, HALF_ERROR_FACTOR, validate_export
    from llada_onnx.models import load_model

    export(llada2_ckpt, tmp_path / "fp16", dtype="fp16", validate=False, moe="decomposed", progress=False)
    report = validate_export(tmp_path / "fp16", load_model(llada2_ckpt, dtype=torch.float16), dtype="fp16")
    half = report["torch_half_mean_abs_diff"]
    assert half > 0 and report["mean_tolerance"] == max(FP16_EXPERTS_MEAN_RELATIVE_ERROR * report["logit_scale"],
                                                        HALF_ERROR_FACTOR * half)
    assert report["logits_mean_abs_diff"] <= report["mean_tolerance"]


@pytest.fixture(scope="module")
def llada2_pipe(tmp_path_factory, llada2_ckpt):
    from llada_onnx.export import export
    from llada_onnx.runtime import Pipeline

    out = tmp_path_factory.mktemp("llada2-export") / "onnx"
    export(llada2_ckpt, out, progress=False)
    return Pipeline.from_pretrained(out)


GRID = [dict(block_length=8, steps=8, threshold=0.95), dict(block_length=8, steps=4, threshold=0.5),
        dict(block_length=4, steps=4, threshold=1.0), dict(block_length=16, steps=8, threshold=0.95,
                                                            eos_early_stop=True),
        dict(block_length=8, steps=8, threshold=0.9, editing_threshold=0.5, max_post_steps=3),
        dict(block_length=8, steps=8, threshold=0.95, temperature=1.0, top_k=50, top_p=0.9)]


def assert_token_exact(pipe, ckpt, options):
    """The NumPy sampler on the export, with the exact block cache and without, against the torch reference on the
    checkpoint: same canvases, token for token, on a left-padded batch whose prompts do and do not divide the block
    (so the rows' blocks start at different canvas positions; seeded noise at temperature > 0)."""
    import numpy as np

    from llada_onnx.runtime.noise import Noise

    model = LLaDA2Model.from_pretrained(ckpt)
    rng = np.random.default_rng(3)
    rows = [rng.integers(0, 1000, size=n) for n in (11, 8, 5)]
    width = max(len(r) for r in rows)
    ids = np.stack([np.concatenate([np.full(width - len(r), EOS), r]) for r in rows])
    mask = np.stack([np.concatenate([np.zeros(width - len(r)), np.ones(len(r))]) for r in rows]).astype(np.int64)
    s = BlockSettings(gen_length=32, **options)
    want = generate(model, torch.from_numpy(ids), torch.from_numpy(mask), settings=s, mask_id=MASK, eos_id=EOS,
                    pad_id=EOS, noise=Noise.of(None, 7)).numpy()
    for cache in ("block", "none"):
        got = pipe.generate_ids(ids, mask, seed=7, **dataclasses.asdict(dataclasses.replace(s, cache=cache)))
        np.testing.assert_array_equal(got, want, err_msg=f"cache={cache}")


@pytest.mark.parametrize("options", GRID, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_runtime_is_token_exact_with_the_torch_block_sampler(llada2_pipe, llada2_ckpt, options):
    assert_token_exact(llada2_pipe, llada2_ckpt, options)


def test_fused_export_rotates_the_leading_dims_in_one_op(tmp_path, llada2_ckpt):
    """``--fusion ort``: each layer's queries and keys, normalised and then rotated on their first ``rotary_dim``
    dims only, become one RotaryEmbedding each (``rotary_embedding_dim`` set, the other dims passed through); the
    export validates with its block cache and the runtime stays token-exact with the torch block sampler."""
    from llada_onnx.export import export
    from llada_onnx.runtime import Pipeline

    cfg = LLaDA2Config.from_pretrained(llada2_ckpt)
    report = export(llada2_ckpt, tmp_path / "ort", fusion="ort", progress=False).validation
    assert report["top_ids_decisive_disagreements"] == 0
    assert report["block_cache"]["cached_max_abs_diff"] < report["block_cache"]["tolerance"]
    graph = onnx.load(str(tmp_path / "ort" / "model.onnx"), load_external_data=False).graph
    rotations = [n for n in graph.node if n.op_type == "RotaryEmbedding"]
    assert len(rotations) == 2 * cfg.num_hidden_layers and cfg.rotary_dim < cfg.head_dim
    assert all({a.name: a.i for a in n.attribute}["rotary_embedding_dim"] == cfg.rotary_dim for n in rotations)
    assert sum(n.op_type == "Cos" for n in graph.node) == 1
    pipe = Pipeline.from_pretrained(tmp_path / "ort")
    for options in (GRID[0], GRID[-1]):
        assert_token_exact(pipe, llada2_ckpt, options)


def test_cached_steps_feed_one_block(llada2_pipe, monkeypatch):
    """With the block cache a step runs the current block only; a block's first step also feeds the block finished
    before it (appended to the cache), the first block's the prompt before it."""
    import numpy as np

    graph = llada2_pipe.graph
    fed, run_block = [], graph.run_block
    monkeypatch.setattr(graph, "run_block", lambda ids, mask, pos, b, cached, *a, **k: fed.append(
        (ids.shape[1], cached.shape[1])) or run_block(ids, mask, pos, b, cached, *a, **k))
    llada2_pipe.generate_ids(np.arange(1, 12)[None], gen_length=24, block_length=8, steps=4, threshold=1.0)
    # prompt 11 = one whole block + 3, so blocks [8, 16) (5 masks: 3 steps of 2), then [16, 24), [24, 32), [32, 40)
    # (the canvas ends on a block boundary: 4 steps each)
    # (fed, cached) per call
    assert fed == [(16, 0), (8, 8), (8, 8), *[(16, 8), (8, 16), (8, 16), (8, 16)],
                   *[(16, 16), (8, 24), (8, 24), (8, 24)], *[(16, 24), (8, 32), (8, 32), (8, 32)]]


def test_verify_compares_with_the_block_sampler(llada2_pipe, llada2_ckpt):
    """``llada-onnx verify`` on a LLaDA2 export: logits at blocks of 4 and the torch block sampler over its full grid
    (the cache off among them), token-exact for an fp32 export."""
    from llada_onnx.export.verify import BLOCK_GRIDS, verify

    report = verify(llada2_ckpt, llada2_pipe.manifest.directory, grid="full")
    assert report["passed"], report["first_failure"]
    assert [case["settings"] for case in report["cases"]] == list(BLOCK_GRIDS["full"])
    assert all(case["token_exact"] for case in report["cases"]) and report["logits"]["decisive_positions"] > 0


def test_a_canvas_beyond_the_model_is_refused(llada2_pipe):
    from llada_onnx.runtime import InputError

    with pytest.raises(InputError, match="needs 8200 positions; the model's max_sequence_length is 4096"):
        llada2_pipe.generate_ids([[5, 6, 7]], gen_length=8192, block_length=8)


def test_a_finished_blocks_tokens_are_final(llada2_pipe):
    """The streaming contract: once the step callback says positions before ``final_until`` are final, they never
    change again (editing on, so committed tokens inside a running block may still change)."""
    import numpy as np

    seen = []
    canvas = llada2_pipe.generate_ids(np.arange(1, 12)[None], gen_length=32, block_length=8, steps=8,
                                      threshold=0.9, editing_threshold=0.5, max_post_steps=2,
                                      callback=lambda info: seen.append((info.final_until[0], info.canvas.copy())))
    assert seen[-1][0] > seen[0][0] >= 11
    for until, snapshot in seen:
        np.testing.assert_array_equal(snapshot[0, :until], canvas[0, :until])



def test_quantize_a_float_export_equals_exporting_quantized(tmp_path, llada2_ckpt, llada2_pipe):
    """``llada-onnx quantize`` of an fp32 LLaDA2 export (no checkpoint, no torch) gives what ``export --quantize int4``
    gives: the same tokens; its block cache stays exact (cached == uncached) on the quantized weights."""
    import numpy as np

    from llada_onnx.export import Quantization, export
    from llada_onnx.export.quantize import quantize_export
    from llada_onnx.runtime import Pipeline

    report = quantize_export(llada2_pipe.manifest.directory, tmp_path / "q", Quantization("int4"), progress=False)
    assert report["finite"] and report["reference"] == "float export (fp32)"
    export(llada2_ckpt, tmp_path / "e", quantization=Quantization("int4"), progress=False)
    quantized, exported = Pipeline.from_pretrained(tmp_path / "q"), Pipeline.from_pretrained(tmp_path / "e")
    assert quantized.manifest.raw["quantized_ops"] == exported.manifest.raw["quantized_ops"]
    prompt = np.arange(3, 14)[None]
    kw = dict(gen_length=24, block_length=8, threshold=0.5)
    canvas = quantized.generate_ids(prompt, **kw)
    np.testing.assert_array_equal(canvas, exported.generate_ids(prompt, **kw))
    np.testing.assert_array_equal(canvas, quantized.generate_ids(prompt, cache="none", **kw))


def test_command_line_export_int4_and_chat(tmp_path, llada2_ckpt, llada2_pipe):
    """``llada-onnx export CKPT OUT --quantize int4`` and ``llada-onnx chat --model OUT --threshold 0.95`` on the
    tiny real-layout checkpoint, the float graph written in a --scratch folder (emptied afterwards); the other
    sampler family's flags are refused in one line (exit 2)."""
    import subprocess
    import sys
    from pathlib import Path

    cli = str(Path(sys.executable).with_name("llada-onnx"))
    out, scratch = tmp_path / "int4", tmp_path / "scratch"
    scratch.mkdir()
    res = subprocess.run([cli, "export", str(llada2_ckpt), str(out), "--quantize", "int4", "--scratch", str(scratch)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert f"saving the graph to {scratch}" in res.stderr and not any(scratch.iterdir())
    assert json.loads((out / "validation.json").read_text())["provider"] == "CPUExecutionProvider"
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert "QMoE" in ops and "MatMulNBits" in ops
    res = subprocess.run([cli, "chat", "--model", str(out), "--threshold", "0.95", "--gen-length", "16",
                          "--block-length", "8"], input="the king\n\n", capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.count("llada>") == 1, res.stderr
    model = str(llada2_pipe.manifest.directory)
    for flags, message in ((["--cfg-scale", "1"], "--cfg-scale is not a setting of the block-diffusion sampler"),
                           (["--cache", "dual"], "--cache prefix/dual are LLaDA's approximate caches; this export (LLaDA2) "
                                                 "always decodes with its exact block cache")):
        res = subprocess.run([cli, "generate", "--model", model, "--prompt", "x", *flags], capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = subprocess.run([cli, "generate", "--prompt", "x", "--editing-threshold", "0.5"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "--editing-threshold is a block-diffusion (LLaDA2) setting" in res.stderr
    res = subprocess.run([cli, "serve", "--model", model, "--remasking", "random"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and "--remasking is not a setting of the block-diffusion sampler" in res.stderr
