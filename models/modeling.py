"""The LLaDA transformer in torch, numerically the official ``modeling_llada.py`` (llama block type).

Parameter names follow the official checkpoint (``model.transformer.*``) so a state dict loads as is. The
forward pass takes an optional ``positions`` index so that the LM head runs only on the rows a sampler needs;
the exporter relies on that to keep the vocabulary-sized matmul off the rest of the canvas.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import LLaDAConfig


class RMSNorm(nn.Module):
    """Official RMSLayerNorm: normalise in float32, cast back to the input dtype, then multiply by the weight.

    Traced for export it divides by the square root instead of multiplying by ``rsqrt``: that is the pattern
    onnxruntime's own optimizer fuses, when it loads the graph, into one ``SimplifiedLayerNormalization`` kernel on
    the providers that have it (CPU, CUDA), while the file keeps standard ONNX ops for the others. The two forms
    differ by rounding only (one ulp of the normalised value); eager torch keeps the official form.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        if torch.compiler.is_exporting():
            h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rotary_tables(length: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables ``[length, head_dim]`` in float32 (see :func:`rotary_at`)."""
    return rotary_at(torch.arange(length, device=device), head_dim, theta)


def rotary_at(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin ``[*positions.shape, head_dim]`` at the given positions, half-rotation layout.

    The angles are ``cat(freqs, freqs)`` as upstream; the sin table carries the sign of ``rotate_half``
    (``cat(-sin, sin)``), so :func:`apply_rotary` swaps the halves without negating one of them per layer:
    ``(-a) * s == a * (-s)`` exactly. The products are the same float32 ones at any position, so a cached step
    rotates exactly as the full forward does.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    sin = freqs.sin()
    return torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-sin, sin), dim=-1)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool) -> torch.Tensor:
    """``t * cos + rotate_half(t) * sin`` over the last axis (head_dim), with ``sin`` signed as
    :func:`rotary_at` makes it; in float32 when the config asks (official)."""
    dtype = t.dtype
    if full_precision:
        t = t.float()
    else:
        cos, sin = cos.to(dtype), sin.to(dtype)
    half = t.shape[-1] // 2
    swapped = torch.cat((t[..., half:], t[..., :half]), dim=-1)
    return (t * cos + swapped * sin).to(dtype)


class LLaDABlock(nn.Module):
    """Pre-norm llama block: bidirectional attention with RoPE, then a SwiGLU MLP (``ff_proj`` is the gate)."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.rope_full_precision = cfg.rope_full_precision
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)
        self.fused = False  # see fuse_projections

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor | None,
                past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """``(x, (k, v))``: the block's output and its own post-RoPE keys/values ``[B, n_kv_heads, n, head_dim]``.

        With ``past`` (cached keys/values ``[B, n_kv_heads, P, head_dim]`` of other positions) the tokens attend
        to those and to themselves; ``bias`` then covers ``P + n`` keys, the past first.
        """
        b, length, _ = x.shape
        h = self.attn_norm(x)
        q, k, v = self._project_qkv(h, cos, sin)
        att = attend(q, k, v, bias, past)
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, length, -1))
        h = self.ff_norm(x)
        if self.fused:
            gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        else:
            gate, up = self.ff_proj(h), self.up_proj(h)
        return x + self.ff_out(F.silu(gate) * up), (k, v)

    def fuse_projections(self) -> None:
        """Join the q/k/v projections into one matrix, and the gate/up ones into another (in place).

        The exporter does this before tracing: a cached step runs a single block of tokens, where every kernel
        launch counts, and one larger matmul replaces three (two). Each output column is the same dot product.
        The weights become real tensors of the graph (quantizable, shared between graphs), not a concatenation
        computed when a session loads. Parameter names then leave the official layout: export only.
        """
        def joined(*linears: nn.Linear) -> nn.Linear:
            first = linears[0].weight
            out = nn.Linear(first.shape[1], sum(lin.weight.shape[0] for lin in linears), bias=False,
                            device=first.device, dtype=first.dtype)
            out.weight = nn.Parameter(torch.cat([lin.weight.detach() for lin in linears]), requires_grad=False)
            return out

        with torch.no_grad():
            self.qkv_proj = joined(self.q_proj, self.k_proj, self.v_proj)
            self.gate_up_proj = joined(self.ff_proj, self.up_proj)
        del self.q_proj, self.k_proj, self.v_proj, self.ff_proj, self.up_proj
        self.fused = True

    def _project_qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries, post-RoPE keys and values ``[B, heads, n, head_dim]``.

        Queries and keys are rotated together, before the heads are moved forward: one rotation per layer
        instead of two (fewer kernels in a cached step).
        """
        b, n, _ = h.shape
        hq, hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if self.fused:
            qkv = self.qkv_proj(h)
        else:
            qkv = torch.cat([self.q_proj(h), self.k_proj(h), self.v_proj(h)], dim=-1)
        qkv = qkv.view(b, n, hq + 2 * hkv, hd)
        qk = apply_rotary(qkv[:, :, :hq + hkv], cos, sin, self.rope_full_precision)
        q, k = qk.transpose(1, 2).split([hq, hkv], dim=1)
        return q, k, qkv[:, :, hq + hkv:].transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
           past: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Bidirectional softmax attention of queries ``[B, heads, n, d]`` over keys/values ``[B, kv_heads, n, d]``
    (grouped-query when fewer), after the cached ``past`` keys/values ``[B, kv_heads, P, d]`` when given;
    ``bias`` is additive over the ``P + n`` keys."""
    if past is None:
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, repeat_heads(k, rep), repeat_heads(v, rep), attn_mask=bias,
                                              is_causal=False)
    return _attend_with_past(q, k, v, *past, bias)


def repeat_heads(t: torch.Tensor, rep: int) -> torch.Tensor:
    """Keys or values ``[B, kv_heads, n, d]`` with each head repeated ``rep`` times in place (``[B, kv_heads * rep,
    n, d]``, as ``repeat_interleave(rep, dim=1)``), for grouped-query attention. Written as expand + reshape: some
    torch versions trace ``repeat_interleave`` with a data-dependent size, which ``torch.export`` then refuses."""
    if rep == 1:
        return t
    b, heads, n, d = t.shape
    return t[:, :, None].expand(b, heads, rep, n, d).reshape(b, heads * rep, n, d)


def _attend_with_past(q, k, v, past_k, past_v, bias):
    """Softmax attention over ``past + fresh`` keys without concatenating them.

    A cached step is small (one block of queries), and ``cat(past, k)`` would copy every layer's cache on every
    step (and repeat it per query head under GQA). Scores are taken against the past and the fresh keys
    separately and only the ``[n, P + n]`` score rows are joined; query heads are grouped under their key head
    instead of repeating the keys. ``bias`` ``[B, 1, 1 or n, P + n]``: per key, or per query and key (block
    diffusion). Measured on the embedded model's CPU step (32 tokens, canvas 276): 4.73 ms against 4.97 ms for
    ``scaled_dot_product_attention`` over the concatenation.
    """
    b, heads, n, hd = q.shape
    kv_heads = k.shape[1]
    q = (q * hd ** -0.5).reshape(b, kv_heads, heads // kv_heads, n, hd)
    past_k, past_v, k, v = (t[:, :, None] for t in (past_k, past_v, k, v))
    scores = torch.cat([q @ past_k.transpose(-1, -2), q @ k.transpose(-1, -2)], dim=-1) + bias[:, :, None]
    p = torch.softmax(scores, dim=-1)
    cached = past_k.shape[3]
    att = p[..., :cached] @ past_v + p[..., cached:] @ v
    return att.reshape(b, heads, n, hd)


def padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive key-padding bias ``[B, 1, 1, L]``: 0 for tokens, the dtype's most negative value for padding
    (upstream's choice)."""
    keep = (attention_mask != 0)[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


def cached_bias(attention_mask: torch.Tensor, positions: torch.Tensor, cached: int, dtype: torch.dtype):
    """The bias of a KV-cached call ``[B, 1, 1, P + n]``: the cache's entries of the fed ``positions`` are stale
    and masked out (the fed tokens attend to their own fresh keys instead), padding is masked everywhere."""
    keep = attention_mask != 0
    keep = torch.cat([keep.scatter(1, positions, False)[:, :cached], torch.gather(keep, 1, positions)], dim=1)
    return padding_bias(keep, dtype)


def optional_padding_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype,
                          always: bool) -> torch.Tensor | None:
    """:func:`padding_bias`, or None when there is no mask, or nothing is padded and ``always`` is off (the
    official models then run unmasked; a traced graph needs the bias ``always``, and adding 0 is exact)."""
    if attention_mask is None or not (always or not bool((attention_mask != 0).all())):
        return None
    return padding_bias(attention_mask, dtype)


class MaskPredictor(nn.Module):
    """What every architecture's torch module offers the exporter and the samplers: ``hidden_states``,
    ``cached_hidden_states`` and ``lm_head`` of its own, and on them the logits (:meth:`forward`) and the
    checkpoint IO, written once here."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, always_mask: bool = False) -> torch.Tensor:
        """Logits ``[B, L, vocab]``, or ``[B, count, vocab]`` for the ``positions`` ``[B, count]`` only."""
        h = self.hidden_states(input_ids, attention_mask, always_mask)
        if positions is not None:
            h = torch.gather(h, 1, positions[:, :, None].expand(-1, -1, h.shape[-1]))
        return self.lm_head(h)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "MaskPredictor":
        """Load a Hugging Face checkpoint directory (safetensors only; see :mod:`.checkpoint`)."""
        from .checkpoint import load_model

        return load_model(checkpoint_dir, dtype=dtype, device=device)

    def save_pretrained(self, out_dir: str | Path, *, max_shard_bytes: int | None = None) -> None:
        """Write ``config.json`` and safetensors weights in the official layout (sharded above ``max_shard_bytes``)."""
        from .checkpoint import save_model

        save_model(self, out_dir, max_shard_bytes=max_shard_bytes)


class _Transformer(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.embedding_size, cfg.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        if not cfg.weight_tying:
            self.ff_out = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)


class _Wrapper(nn.Module):
    """Only there so parameter names read ``model.transformer.*`` as in the official checkpoint."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.transformer = _Transformer(cfg)


class LLaDAModel(MaskPredictor):
    """The LLaDA mask predictor: ``(input_ids, attention_mask, positions) -> logits``.

    ``attention_mask`` ([B, L], 1 = token, 0 = pad) becomes an additive key-padding bias with the dtype's most
    negative finite value, as upstream does. In eager mode a mask without zeros is dropped (the official model
    runs unmasked then); ``always_mask=True`` keeps the bias regardless, which is what a traced graph needs and
    gives the same numbers (adding 0 is exact).
    """

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.config = cfg
        self.model = _Wrapper(cfg)

    # ------------------------------------------------------------------ forward
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      always_mask: bool = False) -> torch.Tensor:
        """Final-norm hidden states ``[B, L, d_model]``."""
        t = self.model.transformer
        x = t.wte(input_ids)
        cos, sin = rotary_tables(input_ids.shape[1], self.config.head_dim, self.config.rope_theta, x.device)
        cos, sin = cos[:, None], sin[:, None]  # [L, 1, head_dim]: over [B, L, heads, head_dim]
        bias = optional_padding_bias(attention_mask, x.dtype, always_mask)
        for block in t.blocks:
            x = block(x, cos, sin, bias)[0]
        return t.ln_f(x)

    def cached_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                             past: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        """Run only the tokens ``input_ids`` ``[B, n]`` standing at canvas ``positions`` ``[B, n]`` (block-wise
        approximate KV caching, Fast-dLLM).

        ``attention_mask`` ``[B, L]`` covers the whole canvas; ``past`` holds, per layer, post-RoPE keys and values
        ``[B, n_kv_heads, P, head_dim]`` of canvas positions ``[0, P)`` from an earlier forward. The fed tokens
        attend to the cached entries of every *other* position and to their own fresh keys/values (their stale
        cached entries are masked out), so with an up-to-date cache this equals the full forward. Returns
        final-norm hidden states ``[B, n, d_model]`` and, per layer, the fed tokens' fresh keys and values: feeding
        the whole canvas (``positions = arange(L)``) with an empty past (``P = 0``) is a full forward that yields
        a fresh cache.
        """
        t = self.model.transformer
        x = t.wte(input_ids)
        cos, sin = rotary_at(positions, self.config.head_dim, self.config.rope_theta)
        cos, sin = cos[:, :, None], sin[:, :, None]  # [B, n, 1, head_dim]
        bias = cached_bias(attention_mask, positions, past[0][0].shape[2], x.dtype)
        presents = []
        for block, layer_past in zip(t.blocks, past):
            x, present = block(x, cos, sin, bias, layer_past)
            presents.append(present)
        return t.ln_f(x), presents

    def fuse_projections(self) -> "LLaDAModel":
        """Every block's :meth:`LLaDABlock.fuse_projections` (for export); returns the model."""
        for block in self.model.transformer.blocks:
            block.fuse_projections()
        return self

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        t = self.model.transformer
        weight = t.wte.weight if self.config.weight_tying else t.ff_out.weight
        return F.linear(h, weight)

