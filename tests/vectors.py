"""Shared test vectors: hand-made logit rules fed to both the torch and the NumPy sampler.

``mask_count_rule``: at every position the model predicts the token whose id equals the number of masks left in
that row (so a committed token tells the step at which it was committed), with a confidence that rises left to
right in row 0 and falls in row 1. The expected canvases below were worked out by hand.
"""

from __future__ import annotations

import types

import numpy as np
import torch

from llada_onnx.runtime.manifest import ID_FIELDS
from llada_onnx.runtime.proposal import softmax_at
from llada_onnx.runtime.contract import StepOutput

VOCAB, MASK, EOS, EOT, PAD, BOS = 12, 11, 10, 9, 10, 8
IDS = dict(zip(ID_FIELDS, (MASK, EOS, EOT, BOS, PAD)))


def mask_count_rule(canvas: np.ndarray) -> np.ndarray:
    batch, length = canvas.shape
    logits = np.zeros((batch, length, VOCAB), dtype=np.float32)
    left = (canvas == MASK).sum(axis=1)
    for b in range(batch):
        scale = np.arange(length) if b % 2 == 0 else np.arange(length)[::-1]
        logits[b, np.arange(length), left[b]] = 1.0 + scale
    return logits


# prompt [[1, 2], [3, 4]], gen 4, block 2, steps 4 -> 2 blocks x 2 steps, one token per step.
# Row 0 (confidence rises to the right): step 0 commits pos 3 = 4 masks left, step 1 pos 2 = 3,
# block 2: step 2 pos 5 = 2, step 3 pos 4 = 1. Row 1 (falls to the right): pos 2 = 4, 3 = 3, 4 = 2, 5 = 1.
HAND_PROMPT = np.array([[1, 2], [3, 4]])
HAND_SETTINGS = dict(steps=4, gen_length=4, block_length=2)
HAND_EXPECTED = np.array([[1, 2, 3, 4, 1, 2], [3, 4, 4, 3, 2, 1]])
# Same, steps 2 (one step per block, both block tokens at once: they see 4 and 2 masks left).
HAND_SETTINGS_2 = dict(steps=2, gen_length=4, block_length=2)
HAND_EXPECTED_2 = np.array([[1, 2, 4, 4, 2, 2], [3, 4, 4, 4, 2, 2]])


class TorchRuleModel(torch.nn.Module):
    """A torch 'model' whose logits come from a rule (for the reference sampler)."""

    def __init__(self, rule=mask_count_rule, max_length=64):
        super().__init__()
        self.rule = rule
        self.config = types.SimpleNamespace(mask_token_id=MASK, eos_token_id=EOS, eot_token_id=EOT,
                                            pad_token_id=PAD, max_sequence_length=max_length)

    def forward(self, ids, attention_mask=None):
        return torch.from_numpy(self.rule(ids.numpy()))


class RuleGraph:
    """A stand-in for GraphSession with the same rule (for the NumPy sampler)."""

    def __init__(self, rule=mask_count_rule, max_length=64):
        self.rule = rule
        self.manifest = types.SimpleNamespace(id=IDS.__getitem__, max_sequence_length=max_length)
        self.calls = []

    def run(self, input_ids, attention_mask, positions, *, logits=False):
        self.calls.append((input_ids.shape, positions.shape, logits))
        full = self.rule(input_ids)
        win = np.take_along_axis(full, positions[..., None], axis=1)
        top = win.argmax(-1)
        return StepOutput(top, softmax_at(win, top), win.copy() if logits else None)
