"""The torch-free runtime: token-exact equivalence with the torch reference sampler, text, providers, CLI."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from llada_onnx.export.verify import OPTIONS, SHAPES
from llada_onnx.models.sampler import generate
from llada_onnx.runtime import NotAnExportError, Pipeline, ProviderUnavailableError
from llada_onnx.runtime import providers

from conftest import prompts

# (batch, gen, block, steps) and the sampler options: the grid `llada-onnx verify --grid full` runs for users
GRID = [(batch, *shape) for batch, shape in zip((1, 1, 3, 3, 1, 3, 1), SHAPES)]


def reference(model, ids, mask, **kw):
    return generate(model, torch.from_numpy(ids), torch.from_numpy(mask), **kw).numpy()


@pytest.mark.parametrize("batch,gen,block,steps", GRID)
def test_greedy_grid_is_token_exact(pipeline, loaded_tiny, batch, gen, block, steps):
    ids, mask = prompts(batch, seed=gen + steps)
    kw = dict(steps=steps, gen_length=gen, block_length=block)
    np.testing.assert_array_equal(pipeline.generate_ids(ids, mask, **kw), reference(loaded_tiny, ids, mask, **kw))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_options_are_token_exact(pipeline, loaded_tiny, options):
    ids, mask = prompts(3, seed=7)
    kw = dict(steps=8, gen_length=8, block_length=4, seed=3, **options)
    out = pipeline.generate_ids(ids, mask, **kw)
    np.testing.assert_array_equal(out, reference(loaded_tiny, ids, mask, **kw))
    assert not (out == 126336).any()


def test_stop_token_options_change_the_output(pipeline):
    ids, mask = prompts(3, seed=7)
    kw = dict(steps=16, gen_length=16, block_length=8)
    plain = pipeline.generate_ids(ids, mask, **kw)
    assert np.isin(plain, [126081, 126348]).any()  # the test model does produce EOS/EoT
    assert 126081 not in pipeline.generate_ids(ids, mask, logits_eos_inf=True, **kw)[:, ids.shape[1]:]
    assert not np.array_equal(plain, pipeline.generate_ids(ids, mask, confidence_eos_eot_inf=True, **kw))


def test_gqa_and_tied_exports_are_token_exact(request):
    from llada_onnx.models import LLaDAModel

    for name in ("gqa_sharded", "tied"):
        pipe = Pipeline.from_pretrained(request.getfixturevalue(f"{name}_onnx"))
        model = LLaDAModel.from_pretrained(request.getfixturevalue(f"{name}_ckpt"))
        ids, mask = prompts(2, seed=1)
        kw = dict(steps=8, gen_length=8, block_length=4)
        np.testing.assert_array_equal(pipe.generate_ids(ids, mask, **kw), reference(model, ids, mask, **kw))


@pytest.fixture(scope="module")
def fused_pipeline(tiny_fused_onnx):
    return Pipeline.from_pretrained(tiny_fused_onnx)


@pytest.mark.parametrize("batch,gen,block,steps", GRID[:4])
def test_fused_graph_is_token_exact(fused_pipeline, loaded_tiny, batch, gen, block, steps):
    ids, mask = prompts(batch, seed=gen + steps)
    kw = dict(steps=steps, gen_length=gen, block_length=block)
    np.testing.assert_array_equal(fused_pipeline.generate_ids(ids, mask, **kw),
                                  reference(loaded_tiny, ids, mask, **kw))


@pytest.mark.parametrize("options", OPTIONS[1:3], ids=lambda o: ",".join(o))
def test_fused_graph_options_are_token_exact(fused_pipeline, loaded_tiny, options):
    ids, mask = prompts(3, seed=7)
    kw = dict(steps=8, gen_length=8, block_length=4, seed=3, **options)
    np.testing.assert_array_equal(fused_pipeline.generate_ids(ids, mask, **kw),
                                  reference(loaded_tiny, ids, mask, **kw))


def test_fused_gqa_graph_is_token_exact(gqa_fused_onnx, gqa_sharded_ckpt):
    from llada_onnx.models import LLaDAModel

    pipe = Pipeline.from_pretrained(gqa_fused_onnx)
    ids, mask = prompts(2, seed=1)
    kw = dict(steps=8, gen_length=8, block_length=4)
    np.testing.assert_array_equal(pipe.generate_ids(ids, mask, **kw),
                                  reference(LLaDAModel.from_pretrained(gqa_sharded_ckpt), ids, mask, **kw))


def test_greedy_path_fetches_no_logits_and_predicts_only_masked_positions(pipeline, monkeypatch):
    calls = []
    real = pipeline.graph.run
    mask_id = pipeline.manifest.id("mask_token_id")

    def spy(ids, mask, positions, *, logits=False):
        calls.append((positions.shape, logits, bool((np.take_along_axis(ids, positions, 1) == mask_id).all())))
        return real(ids, mask, positions, logits=logits)

    monkeypatch.setattr(pipeline.graph, "run", spy)
    ids, mask = prompts(2)
    pipeline.generate_ids(ids, mask, steps=4, gen_length=8, block_length=4)
    # two steps per 4-token block, two tokens each: the block's masked positions only (4, then 2)
    assert calls == [((2, 4), False, True), ((2, 2), False, True)] * 2
    calls.clear()
    pipeline.generate_ids(ids, mask, steps=4, gen_length=8, block_length=4, temperature=0.5)
    assert calls == [((2, 4), True, True), ((2, 2), True, True)] * 2  # logits of those positions only


def test_callback_sees_steps_and_can_stop(pipeline):
    ids, mask = prompts(1)
    seen = []
    out = pipeline.generate_ids(ids, mask, steps=8, gen_length=8, block_length=4,
                                callback=lambda info: seen.append((info.block, info.step, len(info.committed[0]))))
    assert seen == [(b, s, 1) for b, s in zip([0] * 4 + [1] * 4, range(8))]
    stopped = pipeline.generate_ids(ids, mask, steps=8, gen_length=8, block_length=4,
                                    callback=lambda info: info.step < 2)
    assert (stopped == 126336).sum() == 5 and not (out == 126336).any()


def test_runtime_is_torch_free(tiny_onnx, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now raises ImportError
        import numpy as np
        import llada_onnx
        from llada_onnx.runtime import Pipeline
        pipe = Pipeline.from_pretrained({str(tiny_onnx)!r})
        out = pipe.generate_ids(np.array([[5, 6, 7]]), steps=4, gen_length=4, block_length=4)
        print(pipe.generate("the king", chat=False, gen_length=4, steps=4, block_length=4))
        assert "torch" not in {{m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}}
        print(out.shape)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "(1, 7)" in res.stdout


# ---------------------------------------------------------------------------------------------- text
def test_chat_template_renders_like_transformers(pipeline):
    text = pipeline.codec.render_chat([{"role": "user", "content": "  hello there \n"},
                                       {"role": "assistant", "content": "hi"},
                                       {"role": "user", "content": "again"}])
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhello there<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nhi<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nagain<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_special_tokens_encode_at_checkpoint_ids(pipeline):
    ids = pipeline.codec.encode(pipeline.codec.render_chat([{"role": "user", "content": "the king"}]))
    assert ids[:2] == [126080, 126346] and 126347 in ids and 126348 in ids
    assert pipeline.codec.encode("<|mdm_mask|>") == [126336]


def test_batch_encode_left_pads_and_decode_cuts_at_stop(pipeline):
    ids, mask = pipeline.codec.encode_batch(["the king", "a good night for the queen"], chat=False)
    assert ids.shape == (2, 6) and (ids[0, :4] == 126081).all() and mask[0].tolist() == [0, 0, 0, 0, 1, 1]
    codec = pipeline.codec
    words = codec.encode("the queen is good")
    assert codec.decode(words + [126348, 126081] + codec.encode("king")) == "the queen is good"
    assert codec.decode_batch(np.array([words + [126081], [126080] + words])) == ["the queen is good"] * 2


def test_generate_text_chat_and_raw(pipeline):
    out = pipeline.generate(["the king", "love"], chat=False, gen_length=4, steps=4, block_length=4)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    conversation = [{"role": "user", "content": "the king"}]
    assert len(pipeline.generate(conversation, gen_length=4, steps=4, block_length=4)) == 1
    assert len(pipeline.generate([conversation, conversation], gen_length=4, steps=4, block_length=4)) == 2


def test_chat_session_keeps_ids_like_upstream(pipeline):
    from llada_onnx.runtime.chat import ChatSession

    chat = ChatSession(pipeline, gen_length=4, steps=4, block_length=4)
    chat.send("the king")
    first = chat.ids.copy()
    assert first[0, 0] == 126080 and 126081 not in first
    chat.send("the queen")
    assert chat.ids[0, :first.shape[1]].tolist() == first[0].tolist()
    assert (chat.ids == 126080).sum() == 1  # the second turn dropped its BOS


# ---------------------------------------------------------------------------------------------- providers
def test_missing_provider_names_package():
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider.*onnxruntime-gpu"):
        providers.resolve("cuda", available=["CPUExecutionProvider"])
    with pytest.raises(ProviderUnavailableError, match="DmlExecutionProvider.*onnxruntime-directml"):
        providers.resolve("dml", available=["CPUExecutionProvider"])
    got = providers.resolve("cuda", device_id=1, available=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert got == [("CUDAExecutionProvider", {"device_id": 1, "use_tf32": 0}), ("CPUExecutionProvider", {})]
    assert providers.resolve([("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})],
                             available=["CUDAExecutionProvider", "CPUExecutionProvider"])[0][1] == \
        {"arena_extend_strategy": "kSameAsRequested", "device_id": 0, "use_tf32": 0}


def test_directml_session_options():
    import onnxruntime as ort

    so = providers.session_options("DmlExecutionProvider", threads=2)
    assert so.enable_mem_pattern is False and so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.intra_op_num_threads == 2
    assert providers.session_options("CPUExecutionProvider").enable_mem_pattern is True


@pytest.mark.parametrize("machine,flags,exact", [("x86_64", {"avx2"}, True), ("x86_64", {"avx2", "avx512_vnni"}, False),
                                                 ("AMD64", {"avx2", "avx_vnni"}, False), ("aarch64", set(), False)])
def test_int8_products_are_exact_where_onnxruntime_would_clamp_them(monkeypatch, machine, flags, exact):
    """x86 CPUs without VNNI clamp onnxruntime's default int8 products: sessions there ask for the exact kernels,
    the others keep the fast ones, and a caller's own setting stands."""
    import onnxruntime as ort

    monkeypatch.setattr(providers.platform, "machine", lambda: machine)
    monkeypatch.setattr(providers, "_cpu_flags", lambda: flags)
    providers.int8_products_saturate.cache_clear()
    try:
        so = providers.session_options("CPUExecutionProvider")
        assert providers._has_entry(so, providers.EXACT_INT8_PRODUCTS) is exact
        own = ort.SessionOptions()
        own.add_session_config_entry(providers.EXACT_INT8_PRODUCTS, "0")
        kept = providers.session_options("CPUExecutionProvider", base=own)
        assert kept.get_session_config_entry(providers.EXACT_INT8_PRODUCTS) == "0"
    finally:
        providers.int8_products_saturate.cache_clear()


def test_silent_fallback_is_caught():
    class FakeSession:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    with pytest.raises(ProviderUnavailableError, match="allow_fallback"):
        providers.check_active(FakeSession(), "CUDAExecutionProvider", allow_fallback=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert providers.check_active(FakeSession(), "CUDAExecutionProvider", True) == "CPUExecutionProvider"
    assert "allow_fallback=True" in str(caught[0].message)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_messages(pipeline, tiny_onnx, tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="no prompts"):
        pipeline.generate([])
    with pytest.raises(ValueError, match="max_sequence_length"):
        pipeline.generate_ids(np.zeros((1, 4090), dtype=np.int64), gen_length=8, steps=8, block_length=8)
    with pytest.raises(ValueError, match="multiple of block_length"):
        pipeline.generate("x", gen_length=10, block_length=4)
    with pytest.raises(ValueError, match="temperature"):
        pipeline.generate("x", temperature=-1)
    with pytest.raises(ValueError, match="unknown remasking"):
        pipeline.generate("x", remasking="nope")
    with pytest.raises(NotAnExportError, match="export it first"):
        Pipeline.from_pretrained(tiny_ckpt)
    stale = tmp_path / "stale"
    stale.mkdir()
    for f in tiny_onnx.iterdir():
        os.symlink(f, stale / f.name)
    (stale / "llada_onnx.json").unlink()
    raw = json.loads((tiny_onnx / "llada_onnx.json").read_text())
    (stale / "llada_onnx.json").write_text(json.dumps(dict(raw, format_version=1)))
    with pytest.raises(NotAnExportError, match="format_version 1 is not supported.*re-export"):
        Pipeline.from_pretrained(stale)
    (stale / "llada_onnx.json").write_text(json.dumps(raw))
    (stale / "model.onnx").unlink()
    names = ["ids", "attention_mask", "positions"]  # not the contract's input names
    graph = helper.make_graph([helper.make_node("Identity", ["ids"], ["top_ids"])], "other",
                              [helper.make_tensor_value_info(n, TensorProto.INT64, None) for n in names],
                              [helper.make_tensor_value_info("top_ids", TensorProto.INT64, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9),
              str(stale / "model.onnx"))
    with pytest.raises(NotAnExportError, match="not those of a forward graph.*re-export"):
        Pipeline.from_pretrained(stale)
    (stale / "model.onnx").unlink()
    os.symlink(tiny_onnx / "model.onnx", stale / "model.onnx")
    (stale / "tokenizer.json").unlink()
    no_tok = Pipeline.from_pretrained(stale)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        no_tok.generate("the king")
    assert no_tok.generate_ids([[5, 6]], gen_length=2, steps=2, block_length=2).shape == (1, 4)


# ---------------------------------------------------------------------------------------------- CLI
def cli(*args):
    return subprocess.run([sys.executable, "-m", "llada_onnx.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_generate_json(tiny_onnx, tmp_path):
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("the king\n\nlove is\n")
    res = cli("generate", "--model", str(tiny_onnx), "--prompt", "a queen", "--file", str(prompt_file), "--raw",
              "--gen-length", "8", "--steps", "8", "--block-length", "4", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert [r["prompt"] for r in data["results"]] == ["a queen", "the king", "love is"]
    assert all(len(r["output_ids"]) == 8 for r in data["results"])
    assert data["settings"]["steps"] == 8 and data["timings"]["tokens_per_second"] > 0
    pipe = Pipeline.from_pretrained(tiny_onnx)
    ids, mask = pipe.codec.encode_batch(["a queen", "the king", "love is"], chat=False)
    want = pipe.generate_ids(ids, mask, gen_length=8, steps=8, block_length=4)[:, ids.shape[1]:]
    assert [r["output_ids"] for r in data["results"]] == want.tolist()


def test_cli_show_steps_and_chat(tiny_onnx):
    res = cli("generate", "--model", str(tiny_onnx), "--prompt", "the king", "--gen-length", "4",
              "--block-length", "4", "--show-steps")
    assert res.returncode == 0, res.stderr
    assert "step 1/4" in res.stderr and "step 4/4" in res.stderr
    canvases = [line[2:] for line in res.stderr.splitlines() if line.startswith("  ")]
    assert [c.count("_") for c in canvases] == [3, 2, 1, 0]  # one token committed per step
    chat = subprocess.run([sys.executable, "-m", "llada_onnx.cli", "chat", "--model", str(tiny_onnx),
                           "--gen-length", "4", "--block-length", "4"], input="the king\nthe queen\n\n",
                          capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("llada>") == 2


@pytest.mark.parametrize("args,needle", [
    (["generate", "--model", "MODEL"], "no prompt given"),
    (["generate", "--model", "/nonexistent", "--prompt", "x"], "not found"),
    (["generate", "--model", "MODEL", "--prompt", "x", "--gen-length", "10", "--block-length", "4"], "multiple"),
    (["generate", "--model", "MODEL", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["generate", "--model", "MODEL", "--prompt", "x", "--provider", "dml"], "onnxruntime-directml"),
])
def test_cli_errors_are_one_line(tiny_onnx, args, needle):
    res = cli(*[str(tiny_onnx) if a == "MODEL" else a for a in args])
    assert res.returncode == 2
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
