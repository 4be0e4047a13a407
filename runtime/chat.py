"""Multi-turn chat that keeps the conversation as upstream's ``chat.py`` does, within the model's context.

Upstream keeps token ids, not messages: each new user turn is rendered alone with the chat template and appended
without its leading BOS, and the previous canvas is kept with every EOS/pad token removed (the answer keeps its
EoT). Re-rendering the whole history would give different ids, hence different answers.

Upstream ends the session when the history outgrows the model's context; here the oldest turns (a user message
and its answer) are dropped instead, keeping the leading BOS, and :attr:`ChatSession.dropped_turns` says how many
so a front end can tell the user.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputError
from .pipeline import Pipeline


class ChatSession:
    def __init__(self, pipeline: Pipeline, *, seed: int | None = None, **settings: Any):
        if not pipeline.codec.has_chat_template:
            raise InputError("this model has no chat template (it is a base model): chat needs an Instruct export; "
                             "for a base model generate from raw prompts (`chat=False`)")
        self.pipeline = pipeline
        self.settings = pipeline.settings(settings, text=True)
        self.seed = seed
        self.ids = np.zeros((1, 0), dtype=np.int64)
        self.turn_starts: list[int] = []  # where each user turn begins in ``ids``
        self.dropped_turns = 0  # by the last send()

    def send(self, text: str) -> str:
        codec, manifest = self.pipeline.codec, self.pipeline.manifest
        turn = codec.encode(codec.render_chat([{"role": "user", "content": text}]))
        bos = manifest.id("bos_token_id")
        history = self.ids
        if history.shape[1]:
            if turn and turn[0] == bos:
                turn = turn[1:]
            starts = self.turn_starts + [history.shape[1]]
        else:
            starts = [1 if turn and turn[0] == bos else 0]
        room = manifest.max_sequence_length - self.settings.gen_length
        self.dropped_turns = 0
        while history.shape[1] + len(turn) > room and len(starts) > 1:
            cut = starts[1] - starts[0]
            history = np.concatenate([history[:, :starts[0]], history[:, starts[1]:]], axis=1)
            starts = [starts[0]] + [s - cut for s in starts[2:]]
            self.dropped_turns += 1
        if history.shape[1] + len(turn) > room:
            raise InputError(f"this message is {len(turn)} tokens; with `gen_length` {self.settings.gen_length} it "
                             f"does not fit the model's context of {manifest.max_sequence_length} tokens: shorten it "
                             "or lower `gen_length`")
        prompt = np.concatenate([history, np.asarray([turn], dtype=np.int64)], axis=1)
        out = self.pipeline.generate_ids(prompt, seed=self.seed, **self.settings.as_dict())
        end = prompt.shape[1] + self.settings.gen_length  # a block-diffusion canvas runs to the end of its block
        answer = codec.decode(out[0, prompt.shape[1]:end])
        out = out[:, :end]
        kept = (out[0] != manifest.id("eos_token_id")) & (out[0] != manifest.id("mask_token_id"))
        self.ids = out[:, kept]
        self.turn_starts = starts
        return answer
