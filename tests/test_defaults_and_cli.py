"""The CLI and the Python API agree: one set of sampler defaults, the same checks, messages in the user's terms;
and the readers of user files never fail with anything but the package's own error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from llada_onnx import __version__
from llada_onnx.models import make_tiny_model
from llada_onnx.models.config import LLaDAConfig
from llada_onnx.models.tiny import LLADA_CHAT_TEMPLATE, write_tiny_tokenizer_files
from llada_onnx.runtime import LladaOnnxError, Manifest, Pipeline, SamplerSettings
from llada_onnx.runtime.chat import ChatSession
from llada_onnx.runtime.manifest import MANIFEST_FILE

ENTRY_POINT = str(Path(sys.executable).with_name("llada-onnx"))


def cli(*args, input=None):
    return subprocess.run([ENTRY_POINT, *map(str, args)], capture_output=True, text=True, timeout=600, input=input)


def error_line(res) -> str:
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    return res.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------ defaults
def test_one_set_of_defaults():
    s = SamplerSettings()
    assert (s.gen_length, s.block_length, s.steps, s.early_stop) == (128, 32, 128, False)
    short = SamplerSettings(gen_length=16)
    assert (short.block_length, short.steps) == (16, 16)  # a block never outgrows the generation
    assert SamplerSettings.of({}, text=True).early_stop is True


def test_readme_examples_agree():
    """`Pipeline.generate("ROMEO.")` and `llada-onnx generate --prompt "ROMEO."` say the same thing."""
    pipe = Pipeline.from_pretrained()
    res = cli("generate", "--prompt", "ROMEO.")
    assert res.returncode == 0, res.stderr
    assert res.stdout == pipe.generate("ROMEO.")[0] + "\n"
    assert len(pipe.generate("ROMEO.", gen_length=64)[0].split()) > 3


@pytest.mark.parametrize("args,flag", [
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--gen-length", "-8"], "--gen-length must be a positive integer"),
    (["--block-length", "0"], "--block-length must be a positive integer"),
    (["--gen-length", "10", "--block-length", "4"], "--gen-length (10) must be a multiple of --block-length (4)"),
    (["--threshold", "0.9", "--factor", "1"], "set either --threshold or --factor"),
    (["--refresh-every", "2"], "--refresh-every needs --cache prefix or dual"),
    (["--chat"], "pass raw prompts with --raw"),
    (["--prompt", "a<|mdm_mask|>b", "--raw"], "pass --allow-mask-in-prompt to infill"),
    (["--gen-length", "8", "--seed", "-1"], "--seed"),
])
def test_messages_name_the_flags(args, flag):
    if "--prompt" not in args:
        args = ["--prompt", "ROMEO.", *args]
    assert flag in error_line(cli("generate", *args))


def test_allow_mask_in_prompt_has_a_flag():
    res = cli("generate", "--prompt", "ROMEO.<|mdm_mask|>", "--raw", "--gen-length", "8", "--allow-mask-in-prompt",
              "--json")
    assert res.returncode == 0, res.stderr


def test_help_shows_every_default_and_version():
    text = " ".join(cli("generate", "--help").stdout.split())
    for needle in ("tokens to generate (default: 128)", "(default 32; at most the gen length)",
                   "(default: the gen length)", "(default: 0.0)", "execution provider (default: cpu)",
                   "(default: low_confidence)", "(default: none)", "--allow-mask-in-prompt", "--no-early-stop",
                   "noise (default: 0)"):
        assert needle in text, needle
    res = cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"llada-onnx {__version__}"


def test_show_steps_draws_text_not_byte_pieces():
    res = cli("generate", "--prompt", "ROMEO.", "--gen-length", "16", "--show-steps")
    assert res.returncode == 0, res.stderr
    canvases = [line[2:] for line in res.stderr.splitlines() if line.startswith("  ")]
    assert len(canvases) == 16 and canvases[0].count("_") == 15 and "_" not in canvases[-1]
    assert not any(piece in res.stderr for piece in ("Ġ", "Ċ"))


# ------------------------------------------------------------------------------------------------ chat
@pytest.fixture(scope="module")
def short_context_onnx(tmp_path_factory):
    """An Instruct-layout tiny export with a 48-token context, so a conversation outgrows it in a few turns."""
    from llada_onnx.export import export

    ckpt = tmp_path_factory.mktemp("short-ckpt")
    model = make_tiny_model(n_layers=1, d_model=32, n_heads=2, max_sequence_length=48, seed=4)
    model.save_pretrained(ckpt)
    write_tiny_tokenizer_files(ckpt, model.config, chat_template=LLADA_CHAT_TEMPLATE)
    out = tmp_path_factory.mktemp("short") / "onnx"
    export(ckpt, out, progress=False)
    return out


def test_chat_drops_the_oldest_turns_instead_of_ending(short_context_onnx):
    pipe = Pipeline.from_pretrained(short_context_onnx)
    chat = ChatSession(pipe, gen_length=8)
    bos = pipe.manifest.id("bos_token_id")
    dropped = []
    for turn in range(6):
        chat.send("the king and the queen")
        dropped.append(chat.dropped_turns)
        assert chat.ids.shape[1] <= 48 and chat.ids[0, 0] == bos and (chat.ids == bos).sum() == 1
    assert sum(dropped) > 0 and dropped[0] == 0
    res = cli("chat", "--model", short_context_onnx, "--gen-length", "8", input="the king and the queen\n" * 6)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("llada>") == 6 and "dropped the oldest" in res.stderr


def test_chat_message_longer_than_the_context(short_context_onnx):
    chat = ChatSession(Pipeline.from_pretrained(short_context_onnx), gen_length=8)
    with pytest.raises(LladaOnnxError, match="does not fit the model's context of 48 tokens"):
        chat.send("the king " * 40)
    res = cli("chat", "--model", short_context_onnx, "--gen-length", "8", input="the king " * 40 + "\nthe king\n")
    assert res.returncode == 0 and res.stdout.count("llada>") == 1  # the conversation goes on
    assert "does not fit the model's context" in res.stderr and "--gen-length" in res.stderr


# ------------------------------------------------------------------------------------------------ fuzzing
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                         max_size=3), max_leaves=6)


@pytest.fixture(scope="module")
def manifest_template(tiny_cache_onnx, tmp_path_factory):
    """A folder of links to a real export's files, and its manifest to mutate."""
    folder = tmp_path_factory.mktemp("fuzz")
    for file in tiny_cache_onnx.iterdir():
        if file.name != MANIFEST_FILE:
            (folder / file.name).symlink_to(file)
    return folder, json.loads((tiny_cache_onnx / MANIFEST_FILE).read_text())


def _mutate(raw: dict, data) -> dict:
    raw = json.loads(json.dumps(raw))
    for _ in range(data.draw(st.integers(1, 3))):
        target = raw
        nested = data.draw(st.sampled_from([None, "special_ids", "sizes", "graphs", "model"]))
        if nested and isinstance(raw.get(nested), dict):
            target = raw[nested]
        key = data.draw(st.sampled_from(sorted(target) or ["x"]))
        if data.draw(st.booleans()):
            target.pop(key, None)
        else:
            target[key] = data.draw(JSON_VALUES)
    return raw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_manifest_fuzz_loads_cleanly_or_says_why(manifest_template, data):
    folder, raw = manifest_template
    (folder / MANIFEST_FILE).write_text(json.dumps(_mutate(raw, data)))
    try:
        Manifest.load(folder)
    except LladaOnnxError:
        pass


SMALL_CONFIG = LLaDAConfig(d_model=16, n_heads=2, n_layers=1, mlp_hidden_size=32, vocab_size=64, embedding_size=64,
                           n_kv_heads=2, mask_token_id=60, eos_token_id=61, pad_token_id=61, bos_token_id=62,
                           eot_token_id=63).to_dict()


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_config_fuzz_loads_cleanly_or_says_why(data):
    try:
        LLaDAConfig.from_dict(_mutate(SMALL_CONFIG, data))
    except LladaOnnxError:
        pass


@settings(max_examples=200, deadline=None)
@given(settings_=st.dictionaries(st.sampled_from(["gen_length", "steps", "block_length", "temperature",
                                                  "cfg_scale", "remasking", "threshold", "factor", "cache",
                                                  "refresh_every", "early_stop", "unknown"]), JSON_VALUES,
                                 max_size=4))
def test_settings_fuzz_load_cleanly_or_say_why(settings_):
    try:
        SamplerSettings.of(settings_)
    except LladaOnnxError:
        pass


def test_tokenizer_config_fuzz(tmp_path, tiny_onnx):
    """A tokenizer_config.json of any JSON shape: a clean load or the package's error."""
    from llada_onnx.runtime import TextCodec

    export = tmp_path / "e"
    shutil.copytree(tiny_onnx, export)
    for content in ("[]", "3", '{"bos_token": 5}', '{"eos_token": {"content": 7}}', "{",
                    '{"added_tokens_decoder": []}'):
        (export / "tokenizer_config.json").write_text(content)
        try:
            TextCodec.from_export(Manifest.load(export)).encode("the king")
        except LladaOnnxError:
            pass


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_moe_config_fuzz_loads_cleanly_or_says_why(data):
    from llada_onnx.models.llada_moe import LLaDAMoEConfig

    raw = LLaDAMoEConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         num_experts=4, num_experts_per_tok=2, expert_intermediate_size=8, vocab_size=64,
                         mask_token_id=60, eos_token_id=61, pad_token_id=61, bos_token_id=61,
                         eot_token_id=62).to_dict()
    try:
        LLaDAMoEConfig.from_dict(_mutate(raw, data))
    except LladaOnnxError:
        pass
