"""Dense LLaDA (LLaDA-8B Base/Instruct, LLaDA-1.5, and the embedded default model): its registry entry.

The configuration is :class:`~.config.LLaDAConfig` (the official field names), the torch module
:class:`~.modeling.LLaDAModel` (the official tensor names), the sampler the official ``generate()``.
"""

from __future__ import annotations

from typing import Any

from ..runtime.contract import ModelSizes
from .config import LLaDAConfig
from .modeling import LLaDAModel
from .registry import Architecture, register


def parameter_count(cfg: LLaDAConfig) -> int:
    hd = cfg.head_dim
    attn = cfg.d_model * (cfg.n_heads * hd + 2 * cfg.n_kv_heads * hd) + cfg.d_model * cfg.d_model
    mlp = 3 * cfg.d_model * cfg.mlp_hidden_size
    per_layer = attn + mlp + 2 * cfg.d_model
    head = 0 if cfg.weight_tying else cfg.embedding_size * cfg.d_model
    return cfg.embedding_size * cfg.d_model + cfg.n_layers * per_layer + cfg.d_model + head


def sizes(cfg: LLaDAConfig) -> ModelSizes:
    return ModelSizes(n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                      vocab_size=cfg.embedding_size, max_sequence_length=cfg.max_sequence_length)


def summary(cfg: LLaDAConfig) -> dict[str, Any]:
    return {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
            "mlp_hidden_size": cfg.mlp_hidden_size, "weight_tying": cfg.weight_tying,
            "parameters": parameter_count(cfg)}


DENSE = register(Architecture(
    name="LLaDAModelLM", description="dense LLaDA: LLaDA-8B Base/Instruct, LLaDA-1.5", config=LLaDAConfig,
    model=LLaDAModel, sampler="llada", graph_kinds=("forward", "kv_cache"), parameter_count=parameter_count,
    sizes=sizes, summary=summary, model_types=("llada",)))
