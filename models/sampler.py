"""The torch reference sampler: a faithful port of the official LLaDA ``generate()`` (generate.py, 2025-10).

It is the yardstick the NumPy runtime is tested against, so it stays close to upstream: a full forward over the
whole canvas and a softmax over every position each step. Departures, each equivalent in distribution:

* Noise comes from an injectable :class:`~llada_onnx.runtime.noise.Noise` (a numpy Generator by default) and is
  drawn only for the window of positions a step can commit (upstream draws it for the whole canvas, but nothing
  outside the window is ever committed). The same seed gives the same output here and in the runtime.
* Ties in the top-k transfer go to the lowest position (``torch.topk`` leaves ties unspecified).
* Ids (mask, EOS, EoT, pad) come from the model's checkpoint instead of the 8B constants.
* Invalid settings raise :class:`~llada_onnx.runtime.errors.InputError` (a ``ValueError``) instead of asserting.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..runtime.errors import InputError
from ..runtime.noise import Noise, NoiseLike
from ..runtime.settings import SamplerSettings, suppressed_confidence_ids, window_start


def get_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """Upstream's schedule: n masked tokens over s steps, ``n // s`` each, the first ``n % s`` steps one more."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num = torch.zeros(mask_num.size(0), steps, device=mask_index.device, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num[i, : remainder[i]] += 1
    return num


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    steps: int | None = None,
    gen_length: int | None = None,
    block_length: int | None = None,
    temperature: float | None = None,
    cfg_scale: float | None = None,
    remasking: str | None = None,
    mask_id: int | None = None,
    logits_eos_inf: bool | None = None,
    confidence_eos_eot_inf: bool | None = None,
    *,
    eos_id: int | None = None,
    eot_id: int | None = None,
    pad_id: int | None = None,
    noise: NoiseLike = None,
    seed: int | None = None,
    **settings,
) -> torch.Tensor:
    """Generate with the official sampler; returns the whole canvas ``[B, Lp + gen_length]``.

    The official arguments keep their places; a setting left at None takes :class:`SamplerSettings`' default
    (the same as the runtime's), and ``settings`` takes its other exact-sampler fields
    (``confidence_eos_eot_inf_fixed``, ``allow_mask_in_prompt``). ``model(input_ids, attention_mask)`` must
    return logits ``[B, L, vocab]`` (an :class:`LLaDAModel` does). Ids default to the model's config.
    ``noise``/``seed``: see :class:`~llada_onnx.runtime.noise.Noise`.
    """
    official = dict(steps=steps, gen_length=gen_length, block_length=block_length, temperature=temperature,
                    cfg_scale=cfg_scale, remasking=remasking, logits_eos_inf=logits_eos_inf,
                    confidence_eos_eot_inf=confidence_eos_eot_inf)
    s = SamplerSettings.of({**{k: v for k, v in official.items() if v is not None}, **settings})
    if s.parallel or s.cache != "none" or s.early_stop:
        raise InputError("the torch reference is the exact sampler: fast decoding (`threshold`, `factor`, "
                         "`cache`) and `early_stop` are runtime options")
    steps, gen_length, block_length = s.steps, s.gen_length, s.block_length
    temperature, cfg_scale, remasking, logits_eos_inf = s.temperature, s.cfg_scale, s.remasking, s.logits_eos_inf
    cfg = model.config
    mask_id = cfg.mask_token_id if mask_id is None else mask_id
    eos_id = cfg.eos_token_id if eos_id is None else eos_id
    eot_id = cfg.eot_token_id if eot_id is None else eot_id
    pad_id = cfg.pad_token_id if pad_id is None else pad_id
    s.check_request(prompt.cpu().numpy(), None if attention_mask is None else attention_mask.cpu().numpy(),
                    mask_id=mask_id, pad_id=pad_id, max_length=cfg.max_sequence_length)
    rng = Noise.of(noise, seed)
    suppressed = list(suppressed_confidence_ids(s, eos_id=eos_id, eot_id=eot_id))
    device = prompt.device
    batch, prompt_len = prompt.shape

    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :prompt_len] = prompt.clone()
    if attention_mask is not None:
        attention_mask = torch.cat(
            [attention_mask, torch.ones((batch, gen_length), dtype=attention_mask.dtype, device=device)], dim=-1)
    prompt_index = x != mask_id

    for num_block in range(s.num_blocks):
        block_start = prompt_len + num_block * block_length
        block_end = block_start + block_length
        block_mask_index = x[:, block_start:block_end] == mask_id
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, s.steps_per_block)
        for i in range(s.steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                x_ = torch.cat([x, un_x], dim=0)
                mask_ = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=0)
                logits, un_logits = torch.chunk(model(x_, mask_), 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x, attention_mask)

            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf

            lo = window_start(x.cpu().numpy(), mask_id, block_start)
            x0 = torch.argmax(logits, dim=-1)
            if temperature > 0:
                u = torch.from_numpy(rng.gumbel_uniforms((batch, block_end - lo, logits.shape[-1]))).to(device)
                noisy = logits[:, lo:block_end].to(torch.float64).exp() / (-torch.log(u)) ** temperature
                x0[:, lo:block_end] = torch.argmax(noisy, dim=-1)

            if suppressed:
                logits[:, :, suppressed] = -torch.inf

            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            else:
                x0_p = torch.full(x0.shape, -np.inf, dtype=torch.float32, device=device)
                x0_p[:, lo:block_end] = torch.from_numpy(rng.remask_uniforms((batch, block_end - lo))).to(device)

            x0_p[:, block_end:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)

            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                k = int(num_transfer_tokens[j, i])
                order = torch.sort(confidence[j], descending=True, stable=True).indices
                transfer_index[j, order[:k]] = True
            x[transfer_index] = x0[transfer_index]
    return x
