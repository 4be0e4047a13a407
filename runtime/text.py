"""Text in and out: the checkpoint's tokenizer, its chat template, and batch decoding.

Chat templates are jinja code from downloaded files, so they are rendered in jinja2's immutable sandbox with the
same environment transformers uses (trim_blocks, lstrip_blocks, loop controls, ``tojson``), giving the same
string ``tokenizer.apply_chat_template(..., add_generation_prompt=True, tokenize=False)`` would.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from .manifest import Manifest

Message = dict[str, str]
Conversation = list[Message]
Prompts = Union[str, Sequence[str], Conversation, Sequence[Conversation]]


class TextCodec:
    """Tokenizer + chat template + decoding rules of one export."""

    def __init__(self, tokenizer, manifest: Manifest, special_tokens: dict[str, str]):
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.special_tokens = special_tokens
        self.stop_ids = {manifest.id("eos_token_id"), manifest.id("eot_token_id")}

    @classmethod
    def from_export(cls, manifest: Manifest) -> "TextCodec":
        from tokenizers import Tokenizer

        file = manifest.directory / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"{manifest.directory} has no tokenizer.json, so text cannot be encoded; copy the checkpoint's "
                "tokenizer.json into the export directory, or call generate_ids() with token ids")
        specials = {}
        tok_cfg = manifest.directory / "tokenizer_config.json"
        if tok_cfg.is_file():
            raw = json.loads(tok_cfg.read_text(encoding="utf-8"))
            for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                value = raw.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    specials[key] = value
        return cls(Tokenizer.from_file(str(file)), manifest, specials)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.manifest.chat_template)

    @cached_property
    def _template(self):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"chat template error: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.manifest.chat_template)

    def render_chat(self, conversation: Conversation) -> str:
        if not self.has_chat_template:
            raise ValueError("this model has no chat template (it is a base model): pass raw prompts with chat=False")
        for message in conversation:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"chat messages must be {{'role': ..., 'content': ...}} dicts, got {message!r}")
        return self._template.render(messages=conversation, add_generation_prompt=True, **self.special_tokens)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, prompts: Prompts, chat: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise and LEFT-pad with the pad id; returns ``(input_ids, attention_mask)``, both int64."""
        texts = self.prompt_texts(prompts, self.has_chat_template if chat is None else chat)
        encoded = [self.encode(t) for t in texts]
        empty = [i for i, ids in enumerate(encoded) if not ids]
        if empty:
            raise ValueError(f"prompt(s) {empty} encode to no tokens; give each prompt some text")
        return left_pad(encoded, self.manifest.id("pad_token_id"))

    def prompt_texts(self, prompts: Prompts, chat: bool) -> list[str]:
        if isinstance(prompts, str):
            items: list[Any] = [prompts]
        elif isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], dict):
            items = [list(prompts)]  # one conversation
        else:
            items = list(prompts)
        if not items:
            raise ValueError("no prompts given; pass a string, a list of strings, or chat messages")
        texts = []
        for item in items:
            if isinstance(item, str):
                texts.append(self.render_chat([{"role": "user", "content": item}]) if chat else item)
            elif isinstance(item, Sequence) and all(isinstance(m, dict) for m in item):
                if not chat:
                    raise ValueError("chat messages were given with chat=False; pass plain strings instead")
                texts.append(self.render_chat(list(item)))
            else:
                raise ValueError(f"a prompt must be a string or a list of chat messages, got {type(item).__name__}")
        return texts

    def decode(self, ids: Sequence[int]) -> str:
        """Cut at the first EOS/EoT, then decode with special tokens skipped."""
        ids = [int(i) for i in ids]
        for pos, token in enumerate(ids):
            if token in self.stop_ids:
                ids = ids[:pos]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_batch(self, rows: np.ndarray) -> list[str]:
        return [self.decode(row) for row in rows]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq):] = seq
            mask[row, width - len(seq):] = 1
    return ids, mask


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()]
