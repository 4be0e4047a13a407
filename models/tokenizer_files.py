"""The tokenizer side of a checkpoint in the official layout: ``tokenizer.json`` plus the three small JSON files.

LLaDA states its special tokens by text in ``tokenizer_config.json`` (``added_tokens_decoder``) and its BOS in
``generation_config.json``. Both the random tiny checkpoints and the trained default model write them here, so
every checkpoint the project makes carries its own ids and nothing downstream can lean on the 8B values.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import LLaDAConfig

# The special tokens of LLaDA-8B, by text, in the order of their ids there.
SPECIAL_TOKEN_TEXTS = ("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>",
                       "<|end_header_id|>", "<|eot_id|>")


def write_tokenizer_files(out: str | Path, cfg: LLaDAConfig, tokenizer, *, chat_template: str | None) -> None:
    """Write ``tokenizer.json`` (a ``tokenizers.Tokenizer``) and the HF configs that state the special ids.

    The ids come from the tokenizer itself; they must agree with the model config, or generation would mask,
    stop or pad with the wrong token.
    """
    out = Path(out)
    specials = {text: tokenizer.token_to_id(text) for text in SPECIAL_TOKEN_TEXTS}
    missing = [t for t, i in specials.items() if i is None]
    if missing:
        raise ValueError(f"the tokenizer lacks the special token(s) {missing}")
    stated = {"<|startoftext|>": cfg.bos_token_id, "<|endoftext|>": cfg.eos_token_id,
              "<|mdm_mask|>": cfg.mask_token_id, "<|eot_id|>": cfg.eot_token_id}
    wrong = {t: (specials[t], i) for t, i in stated.items() if specials[t] != i}
    if wrong:
        raise ValueError(f"tokenizer and config disagree on special ids (tokenizer, config): {wrong}")
    gen_cfg = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    tok_cfg = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_sequence_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for t, i in sorted(specials.items(), key=lambda kv: kv[1])
        },
    }
    if chat_template is not None:
        tok_cfg["chat_template"] = chat_template
    special_map = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    for name, obj in (("generation_config.json", gen_cfg), ("tokenizer_config.json", tok_cfg),
                      ("special_tokens_map.json", special_map)):
        (out / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    tokenizer.save(str(out / "tokenizer.json"))
