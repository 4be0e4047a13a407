"""The architectures llada-onnx knows, keyed by the name a checkpoint's ``config.json`` gives in
``architectures[0]`` (``model_type`` cannot tell the family apart: LLaDA-MoE's is also ``"llada"``).

Each architecture is one module of this package that builds an :class:`Architecture` and calls :func:`register`;
adding a model to llada-onnx is that module, its import in ``models/__init__.py``, and its tests. Everything
downstream (loading, export, the manifest, the runtime's choice of sampler) asks the registry instead of naming
a model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from ..runtime.contract import GRAPH_KINDS, MAIN_KINDS, ModelSizes
from .config import UnsupportedConfigError, read_config_json


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the rest of llada-onnx needs to know of one architecture."""

    name: str  # config.json's architectures[0]
    description: str  # for messages and the README: "dense LLaDA (LLaDA-8B)"
    config: Any  # the config class: from_pretrained(checkpoint_dir), from_dict(raw, source=...)
    model: Any  # the torch module class, built from a config; its state dict uses the official tensor names
    sampler: str  # the runtime's sampler family that drives its graphs (runtime/manifest.py SAMPLERS)
    graph_kinds: tuple[str, ...]  # which graphs of runtime/contract.py it can be exported as, the main one first
    parameter_count: Callable[[Any], int]  # from the config alone: the exporter's disk and memory checks
    sizes: Callable[[Any], ModelSizes]  # what the runtime needs (the manifest's "sizes")
    summary: Callable[[Any], dict[str, Any]]  # the manifest's informative "model" object
    model_types: tuple[str, ...] = ()  # configs without "architectures" that mean this one
    experts: bool = False  # whether its layers run the MoE op (models/moe.py), which the exporter writes fused or not

    def __post_init__(self) -> None:
        unknown = set(self.graph_kinds) - set(GRAPH_KINDS)
        if unknown or not self.graph_kinds or self.graph_kinds[0] not in MAIN_KINDS:
            raise ValueError(f"{self.name}: graph kinds must start with a main graph ({', '.join(MAIN_KINDS)}) and "
                             f"come from {sorted(GRAPH_KINDS)}")


_ARCHITECTURES: dict[str, Architecture] = {}


def register(architecture: Architecture) -> Architecture:
    if architecture.name in _ARCHITECTURES:
        raise ValueError(f"architecture {architecture.name} is registered twice")
    _ARCHITECTURES[architecture.name] = architecture
    return architecture


def hf_sizes(cfg: Any) -> ModelSizes:
    """:class:`ModelSizes` of a config with the Hugging Face field names (LLaDA-MoE's, LLaDA2's)."""
    return ModelSizes(n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
                      n_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
                      max_sequence_length=cfg.max_position_embeddings)


def supported() -> list[Architecture]:
    return list(_ARCHITECTURES.values())


def architecture_of(raw: dict[str, Any], source: str = "config.json") -> Architecture:
    """The architecture a ``config.json`` object names; an UnsupportedConfigError listing the known ones."""
    names = raw.get("architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        found = _ARCHITECTURES.get(names[0])
        what = f"architectures[0] {names[0]!r}"
    else:
        found = next((a for a in _ARCHITECTURES.values() if raw.get("model_type") in a.model_types), None)
        what = f"model_type {raw.get('model_type')!r} (and no architectures)"
    if found is None:
        known = "; ".join(f"{a.name} ({a.description})" for a in _ARCHITECTURES.values())
        raise UnsupportedConfigError(f"{source}: {what} is not a LLaDA checkpoint this llada-onnx supports; "
                                     f"supported architectures: {known}")
    return found


def read_checkpoint_config(checkpoint_dir: str | Path) -> tuple[Architecture, Any]:
    """The architecture and config of a checkpoint directory."""
    path = Path(checkpoint_dir)
    file, raw = read_config_json(path)
    architecture = architecture_of(raw, str(file))
    return architecture, architecture.config.from_pretrained(path)


def architecture_for(config: Any) -> Architecture:
    """The registered architecture whose config class ``config`` is."""
    for architecture in _ARCHITECTURES.values():
        if type(config) is architecture.config:
            return architecture
    raise UnsupportedConfigError(f"no registered architecture uses {type(config).__name__}")
