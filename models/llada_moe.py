"""LLaDA-MoE (``LLaDAMoEModelLM``: LLaDA-MoE-7B-A1B Base / Instruct / Instruct-TD): config, torch module, registry
entry. Facts: ``shared/reference/LLADA_MOE.md`` and the official ``modeling_lladamoe.py``.

A pre-norm decoder with bidirectional attention: per-head RMSNorm on queries and keys before RoPE (HF
``rotate_half`` layout), and in every layer a mixture of SwiGLU experts. The router is a softmax over all experts
in float32, then top-k, and the raw top-k probabilities are the mixing weights (the official code never
renormalises, whatever ``norm_topk_prob`` says).

One difference from the official code, on purpose: it ignores the attention mask, so its padded rows attend to
padding. Here padded keys are masked as in dense LLaDA, so a left-padded row gives the tokens of the same prompt
unpadded (tested).

Experts run through :func:`~.moe.moe_swiglu`, one op that the exporter writes either as onnxruntime's fused
``com.microsoft.MoE`` kernel or in standard ONNX ops (:mod:`llada_onnx.export.moe`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runtime import json_fields as fields
from .config import CheckpointError, UnsupportedConfigError, refuse_unsupported, read_config_with_ids
from .modeling import MaskPredictor, RMSNorm, apply_rotary, attend, cached_bias, optional_padding_bias, rotary_at
from .moe import StackedExperts, moe_swiglu
from .registry import Architecture, hf_sizes, register

# The official sampler is called with this mask id; checkpoints need not state it (LLADA_MOE.md).
DEFAULT_MASK_ID = 156895
EOT_TOKEN_TEXT = "<|role_end|>"


@dataclasses.dataclass(frozen=True)
class LLaDAMoEConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int
    num_experts_per_tok: int
    expert_intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 8192
    rope_theta: float = 50000.0
    rms_norm_eps: float = 1e-5
    qk_layernorm: bool = True
    mask_token_id: int = DEFAULT_MASK_ID
    eos_token_id: int = 156892
    pad_token_id: int = 156892
    bos_token_id: int = 156892
    eot_token_id: int = 156892

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_sequence_length(self) -> int:
        """The samplers' name for the longest canvas (dense LLaDA's field)."""
        return self.max_position_embeddings

    def special_ids(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in
                ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "eot_token_id")}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> "LLaDAMoEConfig":
        """The official fields; what this implementation does not do is refused, naming the field."""
        refused = {
            "shared_expert_intermediate_size": (lambda v: v not in (None, 0), "a shared expert"),
            "moe_router_enable_expert_bias": (bool, "a router expert bias"),
            "moe_router_score_function": (lambda v: v not in (None, "softmax"), "a router other than softmax"),
            "moe_layer_freq": (lambda v: v not in (None, 1), "dense layers between the MoE layers"),
            "routed_scaling_factor": (lambda v: v not in (None, 1, 1.0), "a routed scaling factor"),
            "attention_bias": (bool, "attention biases"),
            "clip_qkv": (lambda v: v is not None, "q/k/v clipping"),
            "rope_scaling": (lambda v: v is not None, "RoPE scaling"),
            "partial_rotary_factor": (lambda v: v not in (None, 1, 1.0), "partial rotary embeddings"),
            "hidden_act": (lambda v: v not in (None, "silu"), "an expert activation other than SiLU"),
            "tie_word_embeddings": (bool, "a head tied to the embeddings"),
        }
        refuse_unsupported(raw, refused, source=source, architecture="LLaDAMoEModelLM")
        err = CheckpointError
        ints = {name: fields.integer(raw, name, source, err) for name in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts", "num_experts_per_tok",
            "expert_intermediate_size", "vocab_size")}
        kv_heads = fields.integer(raw, "num_key_value_heads", source, err, default=ints["num_attention_heads"])
        heads = ints["num_attention_heads"]
        if ints["hidden_size"] % heads or (ints["hidden_size"] // heads) % 2:
            raise UnsupportedConfigError(f"{source}: hidden_size must split into num_attention_heads heads of even "
                                         "size")
        if ints["num_attention_heads"] % kv_heads:
            raise UnsupportedConfigError(f"{source}: num_attention_heads is not a multiple of num_key_value_heads")
        if ints["num_experts_per_tok"] > ints["num_experts"]:
            raise CheckpointError(f"{source}: num_experts_per_tok exceeds num_experts")
        vocab = ints["vocab_size"]
        ids = {name: fields.integer(raw, name, source, err, minimum=0, below=vocab)
               for name in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "eot_token_id")
               if raw.get(name) is not None}
        eos = ids.get("eos_token_id", cls.eos_token_id)
        return cls(**ints, num_key_value_heads=kv_heads,
                   max_position_embeddings=fields.integer(raw, "max_position_embeddings", source, err, default=8192),
                   rope_theta=fields.number(raw, "rope_theta", source, err, default=50000.0),
                   rms_norm_eps=fields.number(raw, "rms_norm_eps", source, err, default=1e-5),
                   qk_layernorm=bool(raw.get("qk_layernorm", True)),
                   **{"pad_token_id": eos, "bos_token_id": eos, "eot_token_id": eos, **ids})

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> "LLaDAMoEConfig":
        """``config.json``, then ids from ``generation_config.json`` and ``tokenizer_config.json`` (the end of turn
        is ``<|role_end|>`` in this tokenizer family) where the config does not state them."""
        file, raw = read_config_with_ids(Path(checkpoint_dir), EOT_TOKEN_TEXT)
        return cls.from_dict(raw, source=str(file))

    def to_dict(self) -> dict[str, Any]:
        """The official ``config.json`` layout with this model's values."""
        return {
            "architectures": ["LLaDAMoEModelLM"], "model_type": "llada", "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "expert_intermediate_size": self.expert_intermediate_size, "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings, "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps, "qk_layernorm": self.qk_layernorm,
            "tie_word_embeddings": False, "partial_rotary_factor": 1.0, "moe_layer_freq": 1,
            "norm_topk_prob": False, "moe_router_score_function": "softmax", "moe_router_enable_expert_bias": False,
            "shared_expert_intermediate_size": None, "routed_scaling_factor": 1, "hidden_act": "silu",
            "attention_bias": False, "clip_qkv": None, "rope_scaling": None, "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id, "mask_token_id": self.mask_token_id, "use_cache": False,
        }


class _Attention(nn.Module):
    def __init__(self, cfg: LLaDAMoEConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=False)
        if cfg.qk_layernorm:  # one weight over head_dim, shared by the heads
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.rms_norm_eps), RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, bias, past=None):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, n, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q, cos, sin, full_precision=False).transpose(1, 2)
        k = apply_rotary(k, cos, sin, full_precision=False).transpose(1, 2)
        att = attend(q, k, v, bias, past)
        return self.o_proj(att.transpose(1, 2).reshape(b, n, -1)), (k, v)


class _Expert(nn.Module):
    def __init__(self, cfg: LLaDAMoEConfig):
        super().__init__()
        d, i = cfg.hidden_size, cfg.expert_intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)


class _SparseMoE(StackedExperts):
    """The router (``gate``) and the experts under their official names; :meth:`stack_experts` joins them into
    the two weight tensors the MoE op reads (for export, as dense LLaDA joins its projections)."""

    def __init__(self, cfg: LLaDAMoEConfig):
        super().__init__()
        self.k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(_Expert(cfg) for _ in range(cfg.num_experts))

    def forward(self, x):
        b, n, d = x.shape
        flat = x.reshape(b * n, d)
        return moe_swiglu(flat, self.gate(flat), *self.stacked(), self.k).reshape(b, n, d)


class _Layer(nn.Module):
    def __init__(self, cfg: LLaDAMoEConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = _Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = _SparseMoE(cfg)

    def forward(self, x, cos, sin, bias, past=None):
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, bias, past)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), present


class _Backbone(nn.Module):
    def __init__(self, cfg: LLaDAMoEConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LLaDAMoEModel(MaskPredictor):
    """The mask predictor: ``hidden_states``, ``cached_hidden_states``, ``lm_head`` and ``fuse_projections`` as
    dense LLaDA's, which the exporter and the samplers rely on."""

    def __init__(self, cfg: LLaDAMoEConfig):
        super().__init__()
        self.config = cfg
        self.model = _Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # untied; dense LLaDA's lm_head(h)

    def _run(self, input_ids, positions, bias, past):
        x = self.model.embed_tokens(input_ids)
        cos, sin = rotary_at(positions, self.config.head_dim, self.config.rope_theta)
        cos, sin = cos[:, :, None], sin[:, :, None]  # [B, n, 1, head_dim] over [B, n, heads, head_dim]
        presents = []
        for i, layer in enumerate(self.model.layers):
            x, present = layer(x, cos, sin, bias, None if past is None else past[i])
            presents.append(present)
        return self.model.norm(x), presents

    def hidden_states(self, input_ids, attention_mask=None, always_mask: bool = False):
        b, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).expand(b, length)
        bias = optional_padding_bias(attention_mask, self.model.embed_tokens.weight.dtype, always_mask)
        return self._run(input_ids, positions, bias, None)[0]

    def cached_hidden_states(self, input_ids, attention_mask, positions, past):
        """As :meth:`LLaDAModel.cached_hidden_states`: the fed tokens against the cached keys/values."""
        bias = cached_bias(attention_mask, positions, past[0][0].shape[2], self.model.embed_tokens.weight.dtype)
        return self._run(input_ids, positions, bias, past)

    def fuse_projections(self) -> "LLaDAMoEModel":
        """Stack every layer's experts into the MoE op's two weight tensors (for export); returns the model."""
        for layer in self.model.layers:
            layer.mlp.stack_experts()
        return self


def parameter_count(cfg: LLaDAMoEConfig) -> int:
    d, hd = cfg.hidden_size, cfg.head_dim
    attn = d * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd + cfg.num_attention_heads * hd * d
    norms = 2 * d + (2 * hd if cfg.qk_layernorm else 0)
    moe = cfg.num_experts * d + cfg.num_experts * 3 * d * cfg.expert_intermediate_size
    return 2 * cfg.vocab_size * d + cfg.num_hidden_layers * (attn + norms + moe) + d


def summary(cfg: LLaDAMoEConfig) -> dict[str, Any]:
    return {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
            "expert_intermediate_size": cfg.expert_intermediate_size, "parameters": parameter_count(cfg)}


MOE = register(Architecture(
    name="LLaDAMoEModelLM", description="LLaDA-MoE: LLaDA-MoE-7B-A1B Base/Instruct/Instruct-TD",
    config=LLaDAMoEConfig, model=LLaDAMoEModel, sampler="llada", graph_kinds=("forward", "kv_cache"),
    parameter_count=parameter_count, sizes=hf_sizes, summary=summary, experts=True))
