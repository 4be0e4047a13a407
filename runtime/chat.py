"""Multi-turn chat that keeps the conversation as upstream's ``chat.py`` does.

Upstream keeps token ids, not messages: each new user turn is rendered alone with the chat template and appended
without its leading BOS, and the previous canvas is kept with every EOS/pad token removed (the answer keeps its
EoT). Re-rendering the whole history would give different ids, hence different answers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .pipeline import Pipeline


class ChatSession:
    def __init__(self, pipeline: Pipeline, **settings: Any):
        if not pipeline.codec.has_chat_template:
            raise ValueError("this model has no chat template (a base model); use `generate --raw` instead")
        self.pipeline = pipeline
        self.settings = settings
        self.ids = np.zeros((1, 0), dtype=np.int64)

    def send(self, text: str) -> str:
        codec = self.pipeline.codec
        turn = codec.encode(codec.render_chat([{"role": "user", "content": text}]))
        bos = self.pipeline.manifest.id("bos_token_id")
        if self.ids.shape[1] and turn and turn[0] == bos:
            turn = turn[1:]
        prompt = np.concatenate([self.ids, np.asarray([turn], dtype=np.int64)], axis=1)
        out = self.pipeline.generate_ids(prompt, **self.settings)
        answer = codec.decode(out[0, prompt.shape[1]:])
        eos = self.pipeline.manifest.id("eos_token_id")
        self.ids = out[:, out[0] != eos]
        return answer
