"""LLaDA configuration, read from a checkpoint's own files with the official field names.

The model hyper-parameters live in ``config.json``; the special token ids are spread over ``config.json``,
``generation_config.json`` (BOS) and ``tokenizer_config.json`` (EoT, by its token text). Every id is read from
the checkpoint when it states one; the official LLaDA-8B values are only the fallback, because other LLaDA
family checkpoints (LLaDA-MoE, iLLaDA, our own embedded model) use other ids.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..runtime import json_fields as fields
from ..runtime.errors import LladaOnnxError

# Official LLaDA-8B ids, used only when a checkpoint does not state its own.
OFFICIAL_IDS = {
    "mask_token_id": 126336,
    "eos_token_id": 126081,
    "pad_token_id": 126081,
    "bos_token_id": 126080,
    "eot_token_id": 126348,
}
EOT_TOKEN_TEXT = "<|eot_id|>"


class CheckpointError(LladaOnnxError, ValueError):
    """A checkpoint file is damaged, or its weights do not match its config (the message names the file)."""


class CheckpointNotFoundError(LladaOnnxError, FileNotFoundError):
    """The checkpoint directory, or a file it needs, is missing."""


class UnsupportedConfigError(LladaOnnxError, ValueError):
    """The checkpoint asks for a feature this implementation does not have (named in the message)."""


def refuse_unsupported(raw: dict, refused: dict, *, source: str, architecture: str) -> None:
    """``refused``: ``{field: (is_unsupported(value), what it would ask for)}``; the first field present with an
    unsupported value is an :class:`UnsupportedConfigError` naming it."""
    for field, (bad, what) in refused.items():
        if field in raw and bad(raw[field]):
            raise UnsupportedConfigError(f"{source}: unsupported {field}={raw[field]!r}: {what} is not "
                                         f"implemented for {architecture}")


@dataclasses.dataclass(frozen=True)
class LLaDAConfig:
    d_model: int
    n_heads: int
    n_layers: int
    mlp_hidden_size: int
    vocab_size: int
    embedding_size: int
    n_kv_heads: int
    max_sequence_length: int = 4096
    rope_theta: float = 10000.0
    rope_full_precision: bool = True
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False
    mask_token_id: int = OFFICIAL_IDS["mask_token_id"]
    eos_token_id: int = OFFICIAL_IDS["eos_token_id"]
    pad_token_id: int = OFFICIAL_IDS["pad_token_id"]
    bos_token_id: int = OFFICIAL_IDS["bos_token_id"]
    eot_token_id: int = OFFICIAL_IDS["eot_token_id"]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def special_ids(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in OFFICIAL_IDS}

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> "LLaDAConfig":
        """Build from the official ``config.json`` fields, refusing features that are not implemented."""
        model_type = raw.get("model_type")
        if model_type != "llada":
            raise UnsupportedConfigError(
                f"{source}: model_type is {model_type!r}, expected 'llada'; this is not a LLaDA checkpoint"
            )
        _refuse(raw, source, "alibi", lambda v: bool(v), "ALiBi position biases are not implemented (alibi: true)")
        _refuse(raw, source, "rope", lambda v: not v, "only RoPE models are supported (rope: false)")
        _refuse(raw, source, "block_type", lambda v: v not in (None, "llama"),
                "only block_type 'llama' (separate ff_proj gate / up_proj) is implemented")
        _refuse(raw, source, "include_bias", bool, "linear biases are not implemented (include_bias: true)")
        _refuse(raw, source, "include_qkv_bias", bool, "q/k/v biases are not implemented (include_qkv_bias: true)")
        _refuse(raw, source, "bias_for_layer_norm", bool, "norm biases are not implemented (bias_for_layer_norm)")
        _refuse(raw, source, "layer_norm_type", lambda v: v not in (None, "rms"),
                "only RMSNorm is implemented (layer_norm_type must be 'rms')")
        _refuse(raw, source, "layer_norm_with_affine", lambda v: v is False,
                "RMSNorm without weights is not implemented (layer_norm_with_affine: false)")
        _refuse(raw, source, "activation_type", lambda v: v not in (None, "silu", "swiglu"),
                "only the SiLU-gated MLP is implemented (activation_type must be 'silu')")
        _refuse(raw, source, "attention_layer_norm", bool, "q/k layer norms are not implemented")
        _refuse(raw, source, "input_emb_norm", bool, "input embedding norm is not implemented")
        _refuse(raw, source, "scale_logits", bool, "logit scaling is not implemented (scale_logits: true)")
        _refuse(raw, source, "clip_qkv", lambda v: v is not None, "q/k/v clipping is not implemented")
        _refuse(raw, source, "block_group_size", lambda v: v not in (None, 1), "block groups are not implemented")

        err = CheckpointError
        d_model, n_heads = fields.integer(raw, "d_model", source, err), fields.integer(raw, "n_heads", source, err)
        if raw.get("n_kv_heads") is None:
            # OLMo-style configs express MQA as a flag instead of a head count.
            n_kv_heads = 1 if raw.get("multi_query_attention") else n_heads
        else:
            n_kv_heads = fields.integer(raw, "n_kv_heads", source, err)
        if d_model % n_heads:
            raise UnsupportedConfigError(f"{source}: d_model {d_model} is not divisible by n_heads {n_heads}")
        if (d_model // n_heads) % 2:
            raise UnsupportedConfigError(f"{source}: head_dim {d_model // n_heads} must be even for RoPE")
        if n_heads % n_kv_heads:
            raise UnsupportedConfigError(f"{source}: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
        if raw.get("mlp_hidden_size") is None:
            mlp_hidden = fields.integer(raw, "mlp_ratio", source, err, default=4) * d_model
        else:
            mlp_hidden = fields.integer(raw, "mlp_hidden_size", source, err)
        if raw.get("vocab_size") is None:
            vocab_size = fields.integer(raw, "embedding_size", source, err)
        else:
            vocab_size = fields.integer(raw, "vocab_size", source, err)
        embedding_size = fields.integer(raw, "embedding_size", source, err, default=vocab_size)
        if embedding_size < vocab_size:
            raise UnsupportedConfigError(f"{source}: embedding_size {embedding_size} < vocab_size {vocab_size}")
        ids = {name: fields.integer(raw, name, source, err, minimum=0, below=embedding_size)
               for name in OFFICIAL_IDS if raw.get(name) is not None}
        return cls(
            d_model=d_model,
            n_heads=n_heads,
            n_layers=fields.integer(raw, "n_layers", source, err),
            mlp_hidden_size=mlp_hidden,
            vocab_size=vocab_size,
            embedding_size=embedding_size,
            n_kv_heads=n_kv_heads,
            max_sequence_length=fields.integer(raw, "max_sequence_length", source, err, default=4096),
            rope_theta=fields.number(raw, "rope_theta", source, err, default=10000.0),
            rope_full_precision=bool(raw.get("rope_full_precision", True)),
            rms_norm_eps=fields.number(raw, "rms_norm_eps", source, err, default=1e-5),
            weight_tying=bool(raw.get("weight_tying", False)),
            **ids,
        )

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> "LLaDAConfig":
        """Read ``config.json`` plus the special ids of ``generation_config.json`` and ``tokenizer_config.json``."""
        cfg_file, raw = read_config_with_ids(Path(checkpoint_dir), EOT_TOKEN_TEXT)
        return cls.from_dict(raw, source=str(cfg_file))

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict[str, Any]:
        """The official ``config.json`` layout (the 8B file's fields, with this model's values)."""
        return {
            "activation_type": "silu",
            "alibi": False,
            "architectures": ["LLaDAModelLM"],
            "attention_layer_norm": False,
            "bias_for_layer_norm": False,
            "block_group_size": 1,
            "block_type": "llama",
            "d_model": self.d_model,
            "embedding_size": self.embedding_size,
            "eos_token_id": self.eos_token_id,
            "include_bias": False,
            "include_qkv_bias": False,
            "input_emb_norm": False,
            "layer_norm_type": "rms",
            "layer_norm_with_affine": True,
            "mask_token_id": self.mask_token_id,
            "max_sequence_length": self.max_sequence_length,
            "mlp_hidden_size": self.mlp_hidden_size,
            "model_type": "llada",
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "n_layers": self.n_layers,
            "pad_token_id": self.pad_token_id,
            "rms_norm_eps": self.rms_norm_eps,
            "rope": True,
            "rope_full_precision": self.rope_full_precision,
            "rope_theta": self.rope_theta,
            "scale_logits": False,
            "use_cache": False,
            "vocab_size": self.vocab_size,
            "weight_tying": self.weight_tying,
        }


def token_id_by_text(tokenizer_config: dict[str, Any], text: str) -> int | None:
    """Find a special token's id in ``tokenizer_config.json``'s ``added_tokens_decoder`` by its text."""
    decoder = tokenizer_config.get("added_tokens_decoder")
    for key, entry in (decoder.items() if isinstance(decoder, dict) else ()):
        if isinstance(entry, dict) and entry.get("content") == text and str(key).isdigit():
            return int(key)
    return None


def _refuse(raw: dict[str, Any], source: str, field: str, bad, why: str) -> None:
    if field in raw and bad(raw[field]):
        raise UnsupportedConfigError(f"{source}: unsupported {field}={raw[field]!r}: {why}")


def read_config_with_ids(checkpoint_dir: Path, eot_text: str) -> tuple[Path, dict[str, Any]]:
    """``config.json`` with the special ids it leaves out filled in from ``generation_config.json`` (BOS, EOS,
    pad, mask) and from ``tokenizer_config.json`` (the end-of-turn token, found by its text ``eot_text``)."""
    file, raw = read_config_json(checkpoint_dir)
    gen_file, tok_file = checkpoint_dir / "generation_config.json", checkpoint_dir / "tokenizer_config.json"
    gen = _read_json(gen_file) if gen_file.is_file() else {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id"):
        if raw.get(key) is None and isinstance(gen.get(key), int):
            raw[key] = gen[key]
    if tok_file.is_file():
        eot = token_id_by_text(_read_json(tok_file), eot_text)
        if eot is not None:
            raw.setdefault("eot_token_id", eot)
    return file, raw


def read_config_json(checkpoint_dir: Path) -> tuple[Path, dict[str, Any]]:
    """A checkpoint directory's ``config.json``: its path and its object."""
    if not checkpoint_dir.is_dir():
        raise CheckpointNotFoundError(f"checkpoint directory not found: {checkpoint_dir}")
    file = checkpoint_dir / "config.json"
    if not file.is_file():
        raise CheckpointNotFoundError(f"{checkpoint_dir} has no config.json: not a Hugging Face LLaDA checkpoint "
                                      "directory")
    return file, _read_json(file)


def _read_json(path: Path) -> dict[str, Any]:
    return fields.read_object(path, CheckpointError, "download the checkpoint's file again")
