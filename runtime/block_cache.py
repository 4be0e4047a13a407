"""The exact KV cache of block diffusion (LLaDA2): the keys and values of a batch's finished blocks.

Blocks are causal, so a finished block's keys and values never change. Each call of the ``block_forward`` graph
feeds only what the cache does not hold yet: the current block, and, at a block's first step, the finished block
before it (whose keys/values are then appended; at the first block, the whole prompt before it). A step of a
block then runs one block of tokens against the cache instead of the whole prefix, and computes what the
uncached forward computes (the tests hold the two token for token).

Rows keep their own block grids (counted from their first token), so their current blocks start at different
canvas positions. The cache stores row ``r`` shifted right by ``shift[r]`` slots so that every row's current block
starts at the same slot and one concatenation appends a block to all rows; the slots before a row's start are
masked like its padding.

On CUDA the cache stays on the device between calls; appending a block goes through the host once per block
(onnxruntime's Python API has no device-side concatenation), which at LLaDA2-mini's size (40 KB of keys/values
per token in fp16) costs far less than the block's steps.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .contract import StepOutput
from .session import GraphSession


class BlockCache:
    """One generation's cache. ``starts[r]``: the canvas position of row ``r``'s first generated block (a boundary
    of its grid); ``attention_mask`` ``[rows, length]``: the canvas's padding mask."""

    def __init__(self, graph: GraphSession, attention_mask: np.ndarray, starts: Sequence[int], block_length: int,
                 pad_id: int):
        rows, length = attention_mask.shape
        self.graph, self.block_length, self.pad_id = graph, block_length, pad_id
        self.first = max(starts)  # the slot where every row's first generated block starts
        self.shift = [self.first - s for s in starts]
        self.mask = np.zeros((rows, max(self.shift) + length), dtype=np.int64)
        for r, shift in enumerate(self.shift):
            self.mask[r, shift:shift + length] = attention_mask[r]
        self.rows = list(range(rows))
        self.length = 0  # slots [0, length) are cached
        self.kv = graph.past.empty(rows)

    def step(self, canvas: np.ndarray, rows: list[int], block: int, *, logits: bool) -> StepOutput:
        """The predictions for the ``block``-th generated block of ``rows`` (a subset of the earlier calls' rows;
        a row left out is dropped for good), from ``canvas`` ``[rows, length]``."""
        b = self.block_length
        end = self.first + (block + 1) * b
        fed = end - self.length
        if fed < b or not set(rows) <= set(self.rows):
            raise ValueError(f"block {block} of rows {rows} is not after the cached ones ({self.rows}, {self.length})")
        past = self._select(rows)
        ids = np.full((len(rows), fed), self.pad_id, dtype=np.int64)
        for i, r in enumerate(rows):
            lo = self.length - self.shift[r]  # the canvas position of the first fed token (< 0: slots before it)
            source = canvas[r, max(lo, 0):lo + fed]
            ids[i, fed - len(source):] = source
        head = np.ascontiguousarray(np.broadcast_to(np.arange(fed - b, fed, dtype=np.int64), (len(rows), b)))
        mask = self.mask[rows, :end]
        out, presents = self.graph.run_block(ids, np.ascontiguousarray(mask[:, self.length:]), head, b,
                                             np.ascontiguousarray(mask[:, :self.length]), past, logits=logits,
                                             presents=fed > b)
        if fed > b:
            self.kv = [self._append(p, q, fed - b) for p, q in zip(past, presents)]
            self.length = end - b
        return out

    def _select(self, rows: list[int]) -> list[Any]:
        if rows != self.rows:
            index = [self.rows.index(r) for r in rows]
            past = self.graph.past
            self.kv = [past.to_device(past.to_host(t)[index]) for t in self.kv]
            self.rows = rows
        return self.kv

    def _append(self, past: Any, present: Any, n: int) -> Any:
        """``past`` with the first ``n`` fed positions' keys or values after it."""
        state = self.graph.past
        return state.to_device(np.concatenate([state.to_host(past), state.to_host(present)[:, :, :n]], axis=2))
