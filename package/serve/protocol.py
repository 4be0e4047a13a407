"""The OpenAI wire format: requests read into sampler settings, and the final text of a diffusion in progress.

Requests are read by hand rather than through a schema library so that every refusal is one sentence naming
the field. OpenAI fields map to the sampler (``max_tokens`` -> ``gen_length``, ``temperature``, ``seed``,
``stop``; for block diffusion also ``top_p``); every other field of the export's sampler settings
(:class:`~llada_onnx.runtime.settings.SamplerSettings`, or for LLaDA2
:class:`~llada_onnx.runtime.block_settings.BlockSettings`) is an extension field with the Python API's name and
default (``block_length``, ``steps``, ``threshold``, ``cache``, ``editing_threshold``, ...). An OpenAI field this
server cannot honour is refused unless it carries its neutral value (``n`` 1, ``top_p`` 1, ...): silently ignoring
it would return something the client did not ask for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..runtime.block_settings import BlockSettings
from ..runtime.errors import InputError, LladaOnnxError
from ..runtime.settings import SamplerSettings, knobs

COMMON = ("model", "max_tokens", "temperature", "seed", "stop", "stream", "stream_options", "user")
# OpenAI fields accepted only with their neutral value (what they mean when absent)
NEUTRAL = {"n": 1, "top_p": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": None,
           "top_logprobs": None, "logit_bias": None, "echo": False, "suffix": None, "tools": None,
           "tool_choice": None, "functions": None, "function_call": None, "response_format": None,
           "parallel_tool_calls": None}
OPENAI_SAMPLING = ("gen_length", "temperature", "top_p")  # settings that OpenAI's own fields carry
EXTENSIONS = {  # per sampler family: the settings a request names directly
    False: tuple(f.name for f in knobs() if f.name not in OPENAI_SAMPLING),
    True: tuple(f.name for f in dataclasses.fields(BlockSettings) if f.name not in OPENAI_SAMPLING),
}
# how the sampler's names read in this API's messages
FIELD_NAMES = {"gen_length": "max_tokens", "seed": "seed"}


class RequestError(LladaOnnxError, ValueError):
    """A request the server refuses (HTTP 400); the message names the field."""


@dataclass
class Request:
    """One completion request, read and checked."""

    prompt: Any  # a string, or a list of chat messages
    chat: bool
    settings: SamplerSettings | BlockSettings
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool
    stream_canvas: bool


def read_request(body: Any, *, chat: bool, defaults: dict[str, Any], seed: int = 0,
                 block_diffusion: bool = False) -> Request:
    """``body``: the decoded JSON; ``defaults`` and ``seed``: the server's (its command line);
    ``block_diffusion``: the export runs LLaDA2's sampler, whose settings the request then carries."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    extensions = EXTENSIONS[block_diffusion]
    neutral_only = {k: v for k, v in NEUTRAL.items() if not (block_diffusion and k == "top_p")}
    allowed = (set(COMMON) | set(NEUTRAL) | set(extensions) | {"stream_canvas"}
               | ({"messages", "max_completion_tokens"} if chat else {"prompt"}))
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unknown field `{unknown[0]}`; this endpoint takes {', '.join(sorted(allowed))}")
    for name, neutral in neutral_only.items():
        value = body.get(name, neutral)
        if value != neutral and not (neutral is None and value in (False, 0, {}, [])):
            raise RequestError(f"`{name}` {value!r} is not supported by this server (a diffusion sampler); "
                               f"leave it out" + (f" or set it to {neutral}" if neutral is not None else ""))
    if chat:
        prompt = _messages(body.get("messages"))
        tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    else:
        prompt = _prompt(body.get("prompt"))
        tokens = body.get("max_tokens")
    settings = dict(defaults)
    settings.update({k: body[k] for k in extensions if k in body})
    if tokens is not None:
        settings["gen_length"] = tokens
    for name in ("temperature", "top_p") if block_diffusion else ("temperature",):
        if body.get(name) is not None:
            settings[name] = body[name]
    try:
        resolved = BlockSettings.of(settings) if block_diffusion else SamplerSettings.of(settings, text=True)
    except InputError as e:
        raise RequestError(e.render(FIELD_NAMES)) from None
    seed = seed if body.get("seed") is None else body["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise RequestError(f"`seed` must be a non-negative integer, got {seed!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise RequestError("`stream_options` takes only include_usage")
    return Request(prompt, chat, resolved, seed, _stop(body.get("stop")), _flag(body, "stream"),
                   bool(options.get("include_usage", False)), _flag(body, "stream_canvas"))


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool) and value is not None:
        raise RequestError(f"`{name}` must be true or false, got {value!r}")
    return bool(value)


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise RequestError("`prompt` must be one string: send one request per prompt (concurrent requests are "
                           "batched by the server)")
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("`prompt` must be a non-empty string")
    return prompt


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RequestError(f"`messages[{i}]` must be an object with a string role and a string content")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise RequestError("`stop` must be a non-empty string or a list of up to 4 of them")
    return stops


class FinalText:
    """The text of one canvas row that can no longer change, step by step.

    In LLaDA's masked diffusion a committed token is never revised, so the generated tokens before the first
    still-masked position are final. Block diffusion may edit a block's tokens until the block is done, so there the
    sampler says up to where the canvas is final (``final_until``). The decoded text grows monotonically;
    :meth:`update` returns the new part. The text ends at the first EOS/EoT token (as ``Pipeline.generate`` cuts
    it) or just before the first ``stop`` string; a trailing incomplete UTF-8 sequence is held back until its
    bytes are in.
    """

    def __init__(self, codec, prompt_len: int, gen_length: int, stop: list[str]):
        self.codec, self.prompt_len, self.gen_length, self.stop = codec, prompt_len, gen_length, stop
        self.mask_id = codec.manifest.id("mask_token_id")
        self.text, self.tokens, self.finished = "", 0, False
        self.finish_reason = "length"

    def update(self, row: np.ndarray, final_until: int | None = None) -> str:
        gen = row[self.prompt_len:self.prompt_len + self.gen_length]
        if final_until is None:  # masked diffusion: up to the first still-masked position
            masked = np.flatnonzero(gen == self.mask_id)
            final = gen[:masked[0]] if masked.size else gen
        else:  # block diffusion: the finished blocks
            final = gen[:max(0, final_until - self.prompt_len)]
        complete = final.size == gen.size  # every generated position is final
        ended = [i for i, t in enumerate(final.tolist()) if t in self.codec.stop_ids]
        if ended:
            final, complete = final[:ended[0]], True
        text = self.codec.decode(final)
        for s in self.stop:
            cut = text.find(s)
            if cut >= 0:
                text, complete = text[:cut], True
                break
        if not complete:
            text = text.rstrip("\ufffd")
        self.tokens = int(final.size)
        new = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = self.text + new
        if complete:
            self.finished = True
            self.finish_reason = "stop" if (ended or text != self.codec.decode(final)) else "length"
        return new


def canvas_view(codec, row: np.ndarray, prompt_len: int, gen_length: int) -> list:
    """The generated part of a canvas row for the web page: each position's text, ``None`` where still masked."""
    mask_id = codec.manifest.id("mask_token_id")
    return [None if t == mask_id else codec.tokenizer.decode([int(t)], skip_special_tokens=False)
            for t in row[prompt_len:prompt_len + gen_length].tolist()]
