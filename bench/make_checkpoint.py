"""Write a random, peaked LLaDA checkpoint of a given size in the official layout (for export/runtime benchmarks).

    python bench/make_checkpoint.py OUT_DIR --d-model 1024 --n-layers 4   # ~310M parameters, real vocabulary
    python bench/make_checkpoint.py OUT_DIR --config path/to/config.json  # e.g. the real 8B shape
"""

from __future__ import annotations

import argparse
import json

from llada_onnx.models import LLaDAConfig, make_tiny_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=16)
    p.add_argument("--config", help="take the shape from this config.json instead")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    shape = dict(d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads)
    if a.config:
        cfg = LLaDAConfig.from_dict(json.load(open(a.config)))
        shape = dict(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                     mlp_hidden_size=cfg.mlp_hidden_size, vocab_size=cfg.vocab_size)
    make_tiny_checkpoint(a.out_dir, seed=a.seed, max_shard_bytes=2 << 30, **shape)
    print(a.out_dir)


if __name__ == "__main__":
    main()
