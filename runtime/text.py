"""Text in and out: the checkpoint's tokenizer, its chat template, and batch decoding.

Chat templates are jinja code from downloaded files, so they are rendered in jinja2's immutable sandbox with the
same environment transformers uses (trim_blocks, lstrip_blocks, loop controls, ``tojson``), giving the same
string ``tokenizer.apply_chat_template(..., add_generation_prompt=True, tokenize=False)`` would.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from . import json_fields as fields
from .chat_template import compile_chat_template
from .errors import InputError, NotAnExportError
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
            raise NotAnExportError(
                f"{manifest.directory} has no tokenizer.json, so text cannot be encoded; copy the checkpoint's "
                "tokenizer.json into the export directory, or call generate_ids() with token ids")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for any parse error
            raise NotAnExportError(f"{file} is damaged ({e}); copy the checkpoint's tokenizer.json into the "
                                   "export directory again") from None
        specials = {}
        tok_cfg = manifest.directory / "tokenizer_config.json"
        if tok_cfg.is_file():
            raw = fields.read_object(tok_cfg, NotAnExportError, "copy the checkpoint's file into the export again")
            for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                value = raw.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    specials[key] = value
        return cls(tokenizer, manifest, specials)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.manifest.chat_template)

    @cached_property
    def _template(self):
        return compile_chat_template(self.manifest.chat_template)

    def render_chat(self, conversation: Conversation) -> str:
        if not self.has_chat_template:
            raise InputError("this model has no chat template (it is a base model): pass raw prompts with `chat=False`")
        for message in conversation:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise InputError(f"chat messages must be {{'role': ..., 'content': ...}} dicts, got {message!r}")
        try:
            return self._template.render(messages=conversation, add_generation_prompt=True, **self.special_tokens)
        except InputError:
            raise
        except Exception as e:  # jinja2 raises the template's own runtime errors (undefined names, types)
            raise NotAnExportError(f"the chat template of {self.manifest.directory} failed to render "
                                   f"({type(e).__name__}: {e}); fix chat_template in its llada_onnx.json") from None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, prompts: Prompts, chat: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise and LEFT-pad with the pad id; returns ``(input_ids, attention_mask)``, both int64."""
        texts = self.prompt_texts(prompts, self.has_chat_template if chat is None else chat)
        encoded = [self.encode(t) for t in texts]
        empty = [i for i, ids in enumerate(encoded) if not ids]
        if empty:
            raise InputError(f"prompt(s) {empty} encode to no tokens; give each prompt some text")
        return left_pad(encoded, self.manifest.id("pad_token_id"))

    def prompt_texts(self, prompts: Prompts, chat: bool) -> list[str]:
        if isinstance(prompts, str):
            items: list[Any] = [prompts]
        elif isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], dict):
            items = [list(prompts)]  # one conversation
        else:
            items = list(prompts)
        if not items:
            raise InputError("no prompts given; pass a string, a list of strings, or chat messages")
        texts = []
        for item in items:
            if isinstance(item, str):
                texts.append(self.render_chat([{"role": "user", "content": item}]) if chat else item)
            elif isinstance(item, Sequence) and all(isinstance(m, dict) for m in item):
                if not chat:
                    raise InputError("chat messages were given with `chat=False`; pass plain strings instead")
                texts.append(self.render_chat(list(item)))
            else:
                raise InputError(f"a prompt must be a string or a list of chat messages, got {type(item).__name__}")
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

    def render_canvas(self, row: np.ndarray, mask_glyph: str = "_") -> str:
        """A partly denoised canvas row as text: each run of committed tokens decoded (so byte-level pieces become
        characters; special tokens left out), each still-masked position shown as ``mask_glyph``."""
        mask_id = self.manifest.id("mask_token_id")
        pieces, run = [], []
        for token in (int(t) for t in row):
            if token == mask_id:
                if run:
                    pieces.append(self.tokenizer.decode(run, skip_special_tokens=True))
                    run = []
                pieces.append(mask_glyph)
            else:
                run.append(token)
        if run:
            pieces.append(self.tokenizer.decode(run, skip_special_tokens=True))
        return "".join(pieces)


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
    """One prompt per non-empty line of a UTF-8 file (a leading byte-order mark is dropped)."""
    file = Path(path)
    if file.is_dir():
        raise InputError(f"prompt file {file} is a directory; give a text file with one prompt per line")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"prompt file {file} not found") from None
    except UnicodeDecodeError as e:
        raise InputError(f"prompt file {file} is not UTF-8 text ({e.reason}: byte 0x{e.object[e.start]:02x} at "
                         f"offset {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise InputError(f"prompt file {file} cannot be read: {e.strerror}") from None
    return [line for line in text.splitlines() if line.strip()]
