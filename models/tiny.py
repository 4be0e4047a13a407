"""Tiny LLaDA checkpoints in the real layout, for tests and benchmarks (no downloads).

Defaults use the real vocabulary size and the official special ids, so every id path of the 8B model is
exercised. Weights are scaled so that the model is *decisive*: projections at ~1/sqrt(fan_in) make attention and
RoPE separate the masked positions, and the head is scaled for a logit spread of several units. With the
default tiny init (std 0.02) every masked position would see nearly the same logits, and token-exact comparisons
between engines would hinge on rounding noise.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .config import OFFICIAL_IDS, LLaDAConfig
from .modeling import LLaDAModel
from .tokenizer_files import SPECIAL_TOKEN_TEXTS, write_tokenizer_files

OFFICIAL_VOCAB = 126464
# The Instruct chat template, as shipped in LLaDA-8B-Instruct's tokenizer_config.json.
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)
# Where the tiny checkpoints put each special token: the name of a config id field, or (for the header tokens,
# which have no field) an offset from the mask id, as in the 8B vocabulary.
SPECIAL_TOKEN_IDS = dict(zip(SPECIAL_TOKEN_TEXTS, ("bos_token_id", "eos_token_id", "mask_token_id", 10, 11,
                                                    "eot_token_id")))
WORDS = (
    "the a an and or but of to in on at for with from by as is was are be been it he she they we you I not no "
    "yes this that these those there here what which who when where why how all some any each many much more "
    "most other such only own same so than too very can will just should now good new first last long great "
    "little old right big high small large next early young important few public bad able day time year way "
    "thing man world life hand part child eye woman place work week case point number group problem fact king "
    "queen love night heart lord sir death blood sweet fair . , ! ? ; : ' \""
).split()


def special_ids(mask_token_id: int = OFFICIAL_IDS["mask_token_id"], **overrides: int) -> dict[str, int]:
    ids = dict(OFFICIAL_IDS, mask_token_id=mask_token_id)
    ids.update(overrides)
    return ids


def make_tiny_model(
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    mlp_hidden_size: int | None = None,
    vocab_size: int = OFFICIAL_VOCAB,
    weight_tying: bool = False,
    max_sequence_length: int = 4096,
    rope_theta: float = 500000.0,
    logit_std: float = 4.0,
    seed: int = 0,
    ids: dict[str, int] | None = None,
) -> LLaDAModel:
    """A randomly initialised, decisive LLaDA model of the given shape."""
    cfg = LLaDAConfig(
        d_model=d_model, n_heads=n_heads, n_layers=n_layers,
        mlp_hidden_size=mlp_hidden_size or 4 * d_model,
        vocab_size=vocab_size, embedding_size=vocab_size,
        n_kv_heads=n_kv_heads or n_heads,
        max_sequence_length=max_sequence_length, rope_theta=rope_theta,
        weight_tying=weight_tying, **(ids or special_ids()),
    )
    gen = torch.Generator().manual_seed(seed)
    model = LLaDAModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("wte.weight"):
                # Tied: the embedding doubles as the head, so scale it for the logit spread instead.
                std = logit_std / math.sqrt(d_model) if weight_tying else 1.0
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name == "model.transformer.ff_out.weight":
                p.copy_(torch.randn(p.shape, generator=gen) * (logit_std / math.sqrt(d_model)))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
    return model.eval()


def make_tiny_checkpoint(
    out_dir: str | Path,
    *,
    max_shard_bytes: int | None = None,
    with_tokenizer: bool = True,
    chat_template: str | None = LLADA_CHAT_TEMPLATE,
    dtype: torch.dtype = torch.float32,
    **model_kwargs,
) -> Path:
    """Write a tiny checkpoint in the official Hugging Face layout and return its directory.

    ``dtype=torch.bfloat16`` stores the weights as LLaDA's own checkpoints do, at half the disk (8B shape: 16 GB).

    Files: ``config.json``, ``model.safetensors`` (or shards + index), ``generation_config.json``,
    ``tokenizer_config.json`` (ids in ``added_tokens_decoder``, the Instruct chat template),
    ``special_tokens_map.json`` and, with ``with_tokenizer``, a small word-level ``tokenizer.json`` whose special
    tokens sit at the checkpoint's ids.

    The tokenizer knows about 150 words (:data:`WORDS`) at ids 0.., while the random model predicts ids from the
    whole vocabulary: text decoded from its generations is empty (unknown ids decode to nothing). The tokenizer
    is there to encode prompts and chat templates; compare generations by token ids.
    """
    out = Path(out_dir)
    model = make_tiny_model(**model_kwargs).to(dtype)
    model.save_pretrained(out, max_shard_bytes=max_shard_bytes)
    write_tiny_tokenizer_files(out, model.config, chat_template=chat_template)
    if not with_tokenizer:
        (out / "tokenizer.json").unlink()
    return out


def write_tiny_tokenizer_files(out: str | Path, cfg: LLaDAConfig, *, chat_template: str | None) -> None:
    """The word-level tokenizer of :func:`build_word_tokenizer` with the special tokens at ``cfg``'s ids."""
    specials = {text: (getattr(cfg, f) if isinstance(f, str) else cfg.mask_token_id + f)
                for text, f in SPECIAL_TOKEN_IDS.items()}
    write_tokenizer_files(out, cfg, build_word_tokenizer(specials), chat_template=chat_template)


def build_word_tokenizer(specials: dict[str, int]):
    """A word-level ``tokenizers`` tokenizer: :data:`WORDS` at ids 0.., specials at their checkpoint ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab["[UNK]"] = len(vocab)
    vocab.update(specials)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


# LLaDA-MoE's tokenizer family: EOS/pad 156892, the mask 156895 and the end of turn <|role_end|> (LLADA_MOE.md).
MOE_VOCAB = 157184
MOE_SPECIALS = {"<|endoftext|>": 156892, "<role>": 156893, "</role>": 156894, "<|mdm_mask|>": 156895,
                "<|role_end|>": 156896}
MOE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<role>' + message['role'] | upper + '</role>' + message['content'] | trim "
    "+ '<|role_end|>' }}{% endfor %}{{ '<role>ASSISTANT</role>' }}"
)


def make_tiny_moe_model(*, n_layers: int = 2, d_model: int = 64, n_heads: int = 4, n_kv_heads: int | None = None,
                        num_experts: int = 8, experts_per_token: int = 2, expert_size: int = 32,
                        vocab_size: int = MOE_VOCAB, max_positions: int = 4096, logit_std: float = 4.0,
                        seed: int = 0, device: str = "cpu"):
    """A random, decisive LLaDA-MoE model (:mod:`.llada_moe`) in the real layout: real vocabulary and ids, a
    router scaled so that the top-k choice is clear-cut. ``device="cuda"`` draws the weights there (the real
    7.35B shape in seconds rather than minutes); the same seed gives other numbers on another device."""
    from .llada_moe import LLaDAMoEConfig, LLaDAMoEModel

    cfg = LLaDAMoEConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                         num_key_value_heads=n_kv_heads or n_heads, num_experts=num_experts,
                         num_experts_per_tok=experts_per_token, expert_intermediate_size=expert_size,
                         vocab_size=vocab_size, max_position_embeddings=max_positions,
                         eot_token_id=MOE_SPECIALS["<|role_end|>"])
    with torch.device("meta"):
        model = LLaDAMoEModel(cfg)
    return _draw_decisive(model, d_model=d_model, logit_std=logit_std, seed=seed, device=device)


def make_tiny_moe_checkpoint(out_dir: str | Path, *, chat_template: str | None = MOE_CHAT_TEMPLATE,
                             max_shard_bytes: int | None = None, dtype: torch.dtype = torch.float32,
                             **model_kwargs) -> Path:
    """A tiny LLaDA-MoE checkpoint in the official layout (official tensor names, config fields, ids stated by
    the tokenizer files; no mask id in config.json, as the real one) with a word-level tokenizer: as with
    :func:`make_tiny_checkpoint`, decoded generations are empty text; compare token ids."""
    import json

    out = Path(out_dir)
    model = make_tiny_moe_model(**model_kwargs).to(dtype=dtype, device="cpu")
    model.save_pretrained(out, max_shard_bytes=max_shard_bytes)
    config = json.loads((out / "config.json").read_text())
    config.pop("mask_token_id")  # the real checkpoint does not state it: the architecture's default applies
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tiny_moe_tokenizer_files(out, chat_template=chat_template)
    return out


def write_tiny_moe_tokenizer_files(out: str | Path, *, chat_template: str | None) -> None:
    import json

    out = Path(out)
    tok = build_word_tokenizer(MOE_SPECIALS)
    tok_cfg = {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "model_max_length": 8192, "tokenizer_class": "PreTrainedTokenizerFast",
               "added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in MOE_SPECIALS.items()}}
    if chat_template is not None:
        tok_cfg["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": MOE_SPECIALS["<|endoftext|>"]}) + "\n")
    tok.save(str(out / "tokenizer.json"))


def make_tiny_llada2_model(*, n_layers: int = 3, d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 2,
                           head_dim: int = 16, num_experts: int = 16, experts_per_token: int = 4, n_group: int = 4,
                           topk_group: int = 2, expert_size: int = 32, dense_size: int = 96,
                           logit_std: float = 4.0, seed: int = 0, config: dict | None = None, device: str = "cpu"):
    """A random, decisive LLaDA2 model (:mod:`.llada2`) in the real layout: real vocabulary and ids, the first layer
    dense, a shared expert, grouped routing with a non-zero expert bias (so selection and mixing differ).
    ``config``: a ``config.json``'s fields instead of the tiny sizes (the real mini shape for benchmarks; drawn
    on ``device``)."""
    from .llada2 import LLaDA2Config, LLaDA2Model

    cfg = LLaDA2Config.from_dict(config) if config is not None else LLaDA2Config(
        hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        head_dim=head_dim, vocab_size=MOE_VOCAB, intermediate_size=dense_size, moe_intermediate_size=expert_size,
        num_experts=num_experts, num_experts_per_tok=experts_per_token, n_group=n_group, topk_group=topk_group,
        max_position_embeddings=4096)
    with torch.device("meta"):
        model = LLaDA2Model(cfg)
    return _draw_decisive(model, d_model=cfg.hidden_size, logit_std=logit_std, seed=seed, device=device)


def make_tiny_llada2_checkpoint(out_dir: str | Path, *, max_shard_bytes: int | None = None,
                                dtype: torch.dtype = torch.float32, **model_kwargs) -> Path:
    """A tiny LLaDA2 checkpoint in the hub layout: config.json states the pad id only (the mask and EOS ids are the
    architecture's defaults, as for the real one), and the tiny LLaDA-MoE tokenizer (the same vocabulary family)."""
    import json

    out = Path(out_dir)
    model = make_tiny_llada2_model(**model_kwargs).to(dtype=dtype, device="cpu")
    model.save_pretrained(out, max_shard_bytes=max_shard_bytes)
    config = json.loads((out / "config.json").read_text())
    for name in ("mask_token_id", "eos_token_id"):
        config.pop(name)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tiny_moe_tokenizer_files(out, chat_template=MOE_CHAT_TEMPLATE)
    return out


def _draw_decisive(model, *, d_model: int, logit_std: float, seed: int, device: str = "cpu"):
    """Random weights for a model built on the meta device that make it decisive: norms near 1, unit embeddings, a
    head scaled to ``logit_std``, routers scaled so their choice is clear-cut, expert biases (where there are any)
    of 0.1, fan-in scaling elsewhere."""
    gen = torch.Generator(device).manual_seed(seed)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=device)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(("embed_tokens.weight", "word_embeddings.weight")):
                p.copy_(noise)
            elif name == "lm_head.weight":
                p.copy_(noise * (logit_std / math.sqrt(d_model)))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(noise * (3.0 / math.sqrt(d_model)))
            elif name.endswith("expert_bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))
    return model.eval()
