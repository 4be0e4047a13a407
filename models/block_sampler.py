"""The torch reference of LLaDA2's block-diffusion sampler: the official LLaDA2.0 ``generate()`` (dFactory
``modeling_llada2_moe.py``) with its argument names and meanings, LLaDA2.1's token editing, and batches.

Per block, from the one holding the prompt's end: up to ``steps`` times, run the canvas up to the block's end
(block-diffusion attention), propose a token and its probability for each of the block's positions, and commit
every masked position whose probability exceeds ``threshold``; when fewer pass than the schedule's count for this
step (``block_length`` split over ``steps``, as LLaDA), commit that many by probability instead. A block ends when
it has no mask left; generation ends after the block in which an EOS appears (``eos_early_stop``: as soon as an
EOS is committed with no mask before it). ``steps`` is first capped at ``gen_length // minimal_topk``.

Documented differences from the shipped code:

- temperature 0 is greedy (argmax and its softmax probability); the shipped dFactory copy samples at every
  temperature (it has no greedy branch), later copies take the argmax as here;
- sampling (temperature > 0) is Gumbel-max over the filtered logits with uniforms drawn from ``noise`` (a
  :class:`~llada_onnx.runtime.noise.Noise`) in a fixed order (``[rows, block_length, vocab]`` float64 per step of
  the rows still running), so the NumPy runtime given the same noise proposes the same tokens; the distribution
  is ``torch.multinomial``'s;
- batches: each row keeps its own block grid (counted from its own first token, as the model's attention does), so
  a left-padded row generates exactly what it generates alone; rows advance block by block together and a row that
  has finished a block or the whole answer waits;
- LLaDA2.1 editing (``editing_threshold``): in each step an already committed, non-prompt token of the current block
  whose top-1 prediction differs and has probability above the threshold is replaced; after the block's last mask
  is filled, up to ``max_post_steps`` steps of editing alone follow (ending early when one edits nothing). Editing
  earlier blocks (LLaDA2.1's multi-block editing) is out of scope: finished blocks never change.

Returns the canvas ``[batch, length]`` (left padding kept, positions never reached still masked);
:func:`answer_ids` cuts a row as the official ``generate()`` returns it.
"""

from __future__ import annotations

import torch

from ..runtime.block_settings import BlockSettings
from ..runtime.noise import Noise


def propose(logits: torch.Tensor, s: BlockSettings, noise) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and their probabilities ``[rows, n]`` from ``logits`` ``[rows, n, vocab]`` (float32)."""
    logits = logits.float()
    if s.temperature == 0:
        probs = torch.softmax(logits, dim=-1)
        p, x0 = probs.max(dim=-1)
        return x0, p
    if s.temperature != 1.0:
        logits = logits / s.temperature
    if s.top_k is not None:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1:
        ordered, index = torch.sort(logits, dim=-1, descending=True)
        beyond = torch.cumsum(torch.softmax(ordered, dim=-1), dim=-1) > s.top_p
        beyond[..., 1:] = beyond[..., :-1].clone()
        beyond[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(beyond).scatter(-1, index, beyond), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    u = torch.from_numpy(noise.gumbel_uniforms(tuple(logits.shape))).to(logits.device)
    x0 = torch.argmax(logits.double() - torch.log(-torch.log(u)), dim=-1)
    return x0, probs.gather(-1, x0[..., None])[..., 0]


@torch.no_grad()
def generate(model, prompt: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             settings: BlockSettings = BlockSettings(), mask_id: int, eos_id: int, pad_id: int,
             noise: Noise | None = None) -> torch.Tensor:
    """The block-diffusion sampler (module docstring); ``prompt`` ``[batch, P]`` left-padded with
    ``attention_mask``. ``model(ids, mask, block_length=b)`` returns logits ``[batch, L, vocab]``."""
    s, b = settings, settings.block_length
    noise = noise or Noise.of(None)
    rows, width = prompt.shape
    mask_in = torch.ones_like(prompt) if attention_mask is None else attention_mask.to(prompt.device)
    layout = s.layout(mask_in.sum(dim=1).tolist(), width)
    total = layout.total
    x = torch.full((rows, total), pad_id, dtype=torch.long, device=prompt.device)
    am = torch.zeros_like(x)
    x[:, :width], am[:, :width] = prompt, mask_in
    for r in range(rows):
        x[r, width:layout.end(r)] = mask_id
        am[r, width:layout.end(r)] = 1
    prompt_pos = torch.zeros_like(x, dtype=torch.bool)
    prompt_pos[:, :width] = True
    schedule = s.schedule()
    finished = [False] * rows
    for j in range(layout.generations):
        active = [r for r in range(rows) if not finished[r] and layout.running(r, j)]
        if not active:
            break
        spans = {r: layout.span(r, j) for r in active}
        end = max(hi for _, hi in spans.values())
        done = {r: False for r in active}
        post = {r: 0 for r in active}  # editing steps after the block's last mask was filled
        for step in range(s.steps_per_block + s.max_post_steps):
            live = [r for r in active if not done[r]]
            if not live:
                break
            logits = model(x[:, :end], am[:, :end], block_length=b)
            index = torch.stack([torch.arange(*spans[r], device=x.device) for r in live])
            x0, p = propose(logits[live][torch.arange(len(live))[:, None], index], s, noise)
            for i, r in enumerate(live):
                lo, hi = spans[r]
                masked = x[r, lo:hi] == mask_id
                chosen = torch.zeros_like(masked)
                if masked.any():
                    confidence = torch.where(masked, p[i], torch.tensor(float("-inf"), device=p.device))
                    high = confidence > s.threshold
                    n = schedule[min(step, len(schedule) - 1)]
                    if int(high.sum()) >= n:
                        chosen = high
                    else:
                        chosen[torch.topk(confidence, k=min(n, int(masked.sum()))).indices] = True
                edits = torch.zeros_like(masked)
                if s.editing_threshold is not None:
                    edits = (~masked & ~prompt_pos[r, lo:hi] & (x0[i] != x[r, lo:hi])
                             & (p[i] > s.editing_threshold))
                x[r, lo:hi] = torch.where(chosen | edits, x0[i], x[r, lo:hi])
                if not bool((x[r, lo:hi] == mask_id).any()):
                    if not masked.any():  # this was an editing step after the block was filled
                        post[r] += 1
                    done[r] = (s.editing_threshold is None or post[r] >= s.max_post_steps
                               or (not masked.any() and not edits.any()))
                if s.eos_early_stop and bool((x0[i][chosen] == eos_id).any()):
                    gen = x[r, width:hi]
                    eos = (gen == eos_id).nonzero()
                    if len(eos) and bool((gen[:int(eos[0])] != mask_id).all()):
                        done[r] = finished[r] = True
        for r in active:
            lo, hi = spans[r]
            if bool((x[r, width:hi] == eos_id).any()):
                finished[r] = True
    return x


def answer_ids(canvas_row: torch.Tensor, prompt_width: int, gen_length: int, eos_id: int) -> torch.Tensor:
    """What the official ``generate()`` returns for one row: the generated ids up to and including the first EOS
    (at most ``gen_length``)."""
    gen = canvas_row[prompt_width:prompt_width + gen_length]
    eos = (gen == eos_id).nonzero()
    return gen[:int(eos[0]) + 1] if len(eos) else gen
