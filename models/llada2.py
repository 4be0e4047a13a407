"""LLaDA2.x (``LLaDA2MoeModelLM``: LLaDA2.0 / 2.1 mini and flash): config and torch module. Facts:
``shared/reference/LLADA2.md`` and the official ``modeling_llada2_moe.py`` (inclusionAI/dFactory).

A pre-norm decoder with **block-diffusion attention**: position p sees position q iff q's block (of
``block_length`` tokens) is not after p's, so attention is bidirectional inside a block and causal across blocks.
Queries and keys come from one fused ``query_key_value`` projection (GQA), get a per-head RMSNorm, then NeoX
rotary on their first ``head_dim * partial_rotary_factor`` dims. The first ``first_k_dense_replace`` layers have
a dense SwiGLU MLP; the others a DeepSeek-style mixture: the router's sigmoid scores plus an expert bias *select*
(``n_group`` groups ranked by the sum of their two best scores, the best ``topk_group`` groups kept, then the top
``num_experts_per_tok`` experts among them), and the *unbiased* sigmoid scores of the chosen experts, renormalised
and times ``routed_scaling_factor``, mix them; a shared expert is always added. The router runs in float32.

Batches: blocks and rotary positions count each row's own tokens (``cumsum(attention_mask) - 1``), so a
left-padded row computes exactly what the same prompt does alone; padded keys are masked. The official code runs
batch 1 (positions ``arange``, no padding), where both agree.

Because blocks are causal, the keys and values of a finished block never change: :meth:`LLaDA2Model.hidden_states`
takes them as a ``past`` and runs only the tokens fed (the current block, and the finished blocks not cached
yet), which is exact, not an approximation. The exporter traces that one function (``block_forward``: an empty
past is the full forward); :mod:`.block_sampler` is the torch reference sampler (uncached, as the official code).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import json_fields as fields
from .config import CheckpointError, UnsupportedConfigError, read_config_with_ids, refuse_unsupported
from .modeling import MaskPredictor, RMSNorm, apply_rotary, attend, rotary_at
from .moe import StackedExperts, moe_grouped_swiglu
from .registry import Architecture, hf_sizes, register

DEFAULT_MASK_ID = 156895  # the official generate()'s defaults; config.json states only the pad id (LLADA2.md)
DEFAULT_EOS_ID = 156892
EOT_TOKEN_TEXT = "<|role_end|>"  # the tokenizer family's end of turn (that of LLaDA-MoE)


@dataclasses.dataclass(frozen=True)
class LLaDA2Config:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    num_shared_experts: int = 1
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 1
    partial_rotary_factor: float = 0.5
    rope_theta: float = 600000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 16384
    mask_token_id: int = DEFAULT_MASK_ID
    eos_token_id: int = DEFAULT_EOS_ID
    pad_token_id: int = DEFAULT_EOS_ID
    bos_token_id: int = DEFAULT_EOS_ID
    eot_token_id: int = DEFAULT_EOS_ID

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def special_ids(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in
                ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "eot_token_id")}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> "LLaDA2Config":
        """The official fields; what this implementation does not do is refused, naming the field."""
        refused = {
            "score_function": (lambda v: v not in (None, "sigmoid"), "a router score other than sigmoid"),
            "use_bias": (bool, "linear biases"),
            "use_qkv_bias": (bool, "q/k/v biases"),
            "rope_scaling": (lambda v: v is not None, "RoPE scaling"),
            "tie_word_embeddings": (bool, "a head tied to the embeddings"),
            "hidden_act": (lambda v: v not in (None, "silu"), "an activation other than SiLU"),
            "use_sliding_window": (bool, "sliding-window attention"),
            "norm_head": (bool, "a normalised head"),
        }
        refuse_unsupported(raw, refused, source=source, architecture="LLaDA2MoeModelLM")
        err = CheckpointError
        ints = {name: fields.integer(raw, name, source, err) for name in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
            "moe_intermediate_size", "num_experts", "num_experts_per_tok", "n_group", "topk_group")}
        heads = ints["num_attention_heads"]
        kv_heads = fields.integer(raw, "num_key_value_heads", source, err, default=heads)
        head_dim = fields.integer(raw, "head_dim", source, err, default=ints["hidden_size"] // heads)
        factor = fields.number(raw, "partial_rotary_factor", source, err, default=1.0)
        if heads % kv_heads:
            raise UnsupportedConfigError(f"{source}: num_attention_heads is not a multiple of num_key_value_heads")
        if int(head_dim * factor) % 2 or not 0 < factor <= 1:
            raise UnsupportedConfigError(f"{source}: head_dim x partial_rotary_factor must be a positive even number")
        e, g = ints["num_experts"], ints["n_group"]
        if e % g or ints["topk_group"] > g or ints["num_experts_per_tok"] > e // g * ints["topk_group"]:
            raise CheckpointError(f"{source}: num_experts, n_group, topk_group and num_experts_per_tok do not fit "
                                  "(experts split into equal groups; the kept groups must hold the chosen experts)")
        if e // g < 2:
            raise UnsupportedConfigError(f"{source}: groups of fewer than 2 experts (a group scores its best two)")
        vocab = ints["vocab_size"]
        ids = {name: fields.integer(raw, name, source, err, minimum=0, below=vocab)
               for name in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "eot_token_id")
               if raw.get(name) is not None}
        eos = ids.get("eos_token_id", DEFAULT_EOS_ID)  # what the tokenizer files leave unstated ends like EOS
        ids = {"pad_token_id": eos, "bos_token_id": eos, "eot_token_id": eos, **ids}
        return cls(**ints, num_key_value_heads=kv_heads, head_dim=head_dim, partial_rotary_factor=factor,
                   num_shared_experts=fields.integer(raw, "num_shared_experts", source, err, default=0, minimum=0),
                   routed_scaling_factor=fields.number(raw, "routed_scaling_factor", source, err, default=1.0),
                   first_k_dense_replace=fields.integer(raw, "first_k_dense_replace", source, err, default=0,
                                                        minimum=0),
                   rope_theta=fields.number(raw, "rope_theta", source, err, default=600000.0),
                   rms_norm_eps=fields.number(raw, "rms_norm_eps", source, err, default=1e-6),
                   max_position_embeddings=fields.integer(raw, "max_position_embeddings", source, err,
                                                          default=16384),
                   **ids)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> "LLaDA2Config":
        """``config.json``, then ids from ``generation_config.json`` where the config does not state them (the
        mask and EOS ids default to the official sampler's)."""
        file, raw = read_config_with_ids(Path(checkpoint_dir), EOT_TOKEN_TEXT)
        return cls.from_dict(raw, source=str(file))

    def to_dict(self) -> dict[str, Any]:
        """The official ``config.json`` layout with this model's values."""
        return {"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "hidden_act": "silu",
                **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                "score_function": "sigmoid", "moe_router_enable_expert_bias": True, "norm_topk_prob": True,
                "use_bias": False, "use_qkv_bias": False, "tie_word_embeddings": False, "rope_scaling": None,
                "use_cache": False}


def block_positions(attention_mask: torch.Tensor, cached_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's place among its row's tokens (padding: one less than the next token's), for the cached
    positions ``[B, P]`` and the fed ones ``[B, n]``, counted over both. Computed per part, not on one joined mask
    then sliced: a slice at a traced offset has a size some torch versions cannot export."""
    cached = (cached_mask != 0).long()
    fed = torch.cumsum((attention_mask != 0).long(), dim=1) + cached.sum(dim=1, keepdim=True)
    return torch.cumsum(cached, dim=1) - 1, fed - 1


def block_bias(attention_mask: torch.Tensor, cached_mask: torch.Tensor, block_length: int | torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """The additive attention bias ``[B, 1, n, P + n]`` of block diffusion for the fed positions (padding mask
    ``attention_mask`` ``[B, n]``) over the cached ones (``cached_mask`` ``[B, P]``) then themselves: 0 where the
    key is a token whose block is not after the query's, the dtype's most negative value elsewhere. Blocks count
    each row's tokens."""
    cached, fed = block_positions(attention_mask, cached_mask)
    keys = torch.cat([cached, fed], dim=1).div(block_length, rounding_mode="floor")
    keep = torch.cat([cached_mask, attention_mask], dim=1) != 0
    visible = (keys[:, None, :] <= fed.div(block_length, rounding_mode="floor")[:, :, None]) & keep[:, None, :]
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
        ~visible, torch.finfo(dtype).min)[:, None]


class _MLP(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Gate(nn.Module):
    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        # a buffer in the official module, stored in its checkpoints: a parameter here, so it loads and saves
        self.expert_bias = nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)


class _SparseMoE(StackedExperts):
    """The router (``gate``), the experts and the shared expert under their official names; the routed experts run
    through one op (:func:`~.moe.moe_grouped_swiglu`) on weights stacked as :func:`~.moe.moe_swiglu` reads them."""

    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.cfg = cfg
        self.gate = _Gate(cfg)
        self.experts = nn.ModuleList(_MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.num_experts))
        if cfg.num_shared_experts:
            self.shared_experts = _MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)

    def forward(self, x):
        b, n, d = x.shape
        flat = x.reshape(b * n, d)
        c = self.cfg
        logits = F.linear(flat.float(), self.gate.weight.float())
        out = moe_grouped_swiglu(flat, logits, self.gate.expert_bias, *self.stacked(), c.num_experts_per_tok,
                                 c.n_group, c.topk_group, c.routed_scaling_factor).reshape(b, n, d)
        return out + self.shared_experts(x) if hasattr(self, "shared_experts") else out


class _Attention(nn.Module):
    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.rotary_dim = cfg.rotary_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim,
                                         bias=False)
        self.query_layernorm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.key_layernorm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.dense = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def _rotate(self, t, cos, sin):
        r = self.rotary_dim
        return torch.cat([apply_rotary(t[..., :r], cos, sin, full_precision=False), t[..., r:]], dim=-1)

    def forward(self, x, cos, sin, bias, past):
        """The attention output and the fed tokens' post-RoPE keys and values ``[B, n_kv_heads, n, head_dim]``,
        attending over ``past`` (keys/values ``[B, n_kv_heads, P, head_dim]``) then the fed tokens."""
        b, n, _ = x.shape
        qkv = self.query_key_value(x).view(b, n, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)
        q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k = self._rotate(q, cos, sin).transpose(1, 2), self._rotate(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        out = attend(q, k, v, bias, past)
        return self.dense(out.transpose(1, 2).reshape(b, n, -1)), (k, v)


class _Layer(nn.Module):
    def __init__(self, cfg: LLaDA2Config, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = _Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (_MLP(cfg.hidden_size, cfg.intermediate_size) if index < cfg.first_k_dense_replace
                    else _SparseMoE(cfg))

    def forward(self, x, cos, sin, bias, past):
        att, present = self.attention(self.input_layernorm(x), cos, sin, bias, past)
        x = x + att
        return x + self.mlp(self.post_attention_layernorm(x)), present


class _Backbone(nn.Module):
    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(_Layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LLaDA2Model(MaskPredictor):
    """``(input_ids, attention_mask, positions, block_length) -> logits`` (official tensor names); the checkpoint IO
    is :class:`MaskPredictor`'s."""

    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.config = cfg
        self.model = _Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, *, block_length: int | torch.Tensor) -> torch.Tensor:
        """Logits ``[B, L, vocab]``, or ``[B, count, vocab]`` at ``positions`` ``[B, count]`` only."""
        h = self.hidden_states(input_ids, attention_mask, block_length)[0]
        if positions is not None:
            h = torch.gather(h, 1, positions[:, :, None].expand(-1, -1, h.shape[-1]))
        return self.lm_head(h)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      block_length: int | torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                      cached_mask: torch.Tensor | None = None):
        """Final-norm hidden states ``[B, n, hidden]`` of the fed ``input_ids`` ``[B, n]`` and, per layer, their
        post-RoPE keys and values ``[B, n_kv_heads, n, head_dim]``.

        ``past`` holds per layer the keys/values ``[B, n_kv_heads, P, head_dim]`` of the ``P`` positions before the
        fed ones (none by default): whole blocks, finished, so exact. ``attention_mask`` ``[B, n]`` and
        ``cached_mask`` ``[B, P]`` say which fed and which cached positions are tokens (1) or padding (0); rotary
        positions and blocks count each row's tokens over both.
        """
        b, n = input_ids.shape
        x = self.model.word_embeddings(input_ids)
        if past is None:
            empty = x.new_zeros(b, self.config.num_key_value_heads, 0, self.config.head_dim)
            past = [(empty, empty)] * len(self.model.layers)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if cached_mask is None:
            cached_mask = torch.ones(b, past[0][0].shape[2], dtype=torch.long, device=x.device)
        positions = block_positions(attention_mask, cached_mask)[1].clamp(min=0)
        cos, sin = rotary_at(positions, self.config.rotary_dim, self.config.rope_theta)
        cos, sin = cos[:, :, None], sin[:, :, None]  # over [B, n, heads, rotary_dim]
        bias = block_bias(attention_mask, cached_mask, block_length, x.dtype)
        presents = []
        for layer, layer_past in zip(self.model.layers, past):
            x, present = layer(x, cos, sin, bias, layer_past)
            presents.append(present)
        return self.model.norm(x), presents

    def fuse_projections(self) -> "LLaDA2Model":
        """Stack every MoE layer's experts into the op's two weight tensors (for export); returns the model."""
        for layer in self.model.layers:
            if isinstance(layer.mlp, _SparseMoE):
                layer.mlp.stack_experts()
        return self


def parameter_count(cfg: LLaDA2Config) -> int:
    d, hd = cfg.hidden_size, cfg.head_dim
    attn = d * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd + cfg.num_attention_heads * hd * d
    dense = 3 * d * cfg.intermediate_size
    moe = (cfg.num_experts * (d + 1) + 3 * d * cfg.moe_intermediate_size * (cfg.num_experts + cfg.num_shared_experts))
    layers = cfg.first_k_dense_replace * dense + (cfg.num_hidden_layers - cfg.first_k_dense_replace) * moe
    return 2 * cfg.vocab_size * d + cfg.num_hidden_layers * (attn + 2 * d + 2 * hd) + layers + d


def summary(cfg: LLaDA2Config) -> dict[str, Any]:
    return {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
            "n_group": cfg.n_group, "topk_group": cfg.topk_group, "num_shared_experts": cfg.num_shared_experts,
            "moe_intermediate_size": cfg.moe_intermediate_size, "parameters": parameter_count(cfg)}


LLADA2 = register(Architecture(
    name="LLaDA2MoeModelLM", description="LLaDA2.x: LLaDA2.0/2.1 mini and flash (block diffusion, MoE)",
    config=LLaDA2Config, model=LLaDA2Model, sampler="block_diffusion", graph_kinds=("block_forward",),
    parameter_count=parameter_count, sizes=hf_sizes, summary=summary, model_types=("llada2_moe",), experts=True))
