"""How much memory loading LLaDA-MoE-7B-A1B's real-shape bf16 checkpoint takes, and one torch forward after it.

    python -m bench.load_memory [--work .bench] [--tokens 16] [--out bench/results/load-memory-moe-7b]

The checkpoint (the real config: 16 layers, 64 experts of 1,024, vocabulary 157,184; 7.36B parameters, 14.7 GB
in bf16, shards of 5 GB) is written under ``--work`` tensor by tensor, N(0, 0.02) in bf16, so that a machine with
less RAM than the model writes it; its weights are not peaked (memory, not tokens, is measured). Then two fresh
processes: ``load_model(dtype=torch.bfloat16)`` alone, and the load plus one forward of ``--tokens`` masked
tokens; each reports its wall time and peak RSS (mapped pages of the shards included).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from .harness import MOE_PRESETS, machine
from .report import save_report, table

SHARD_BYTES = 5 << 30


def write_checkpoint(out: Path) -> Path:
    """The real-shape checkpoint in the official layout (config, tokenizer files, sharded safetensors, index)."""
    import torch
    from safetensors.torch import save_file

    from llada_onnx.models.registry import read_checkpoint_config
    from llada_onnx.models.tiny import make_tiny_moe_checkpoint

    small = out.parent / (out.name + "-layout")
    make_tiny_moe_checkpoint(small, n_layers=1, d_model=64, n_heads=4, num_experts=4, experts_per_token=2,
                             expert_size=16)
    out.mkdir(parents=True)
    for file in small.iterdir():
        if not file.name.startswith("model"):
            file.rename(out / file.name)
    shape = MOE_PRESETS["moe-7b"]
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_size=shape["d_model"], num_hidden_layers=shape["n_layers"],
                  num_attention_heads=shape["n_heads"], num_key_value_heads=shape["n_heads"],
                  num_experts=shape["num_experts"], num_experts_per_tok=shape["experts_per_token"],
                  expert_intermediate_size=shape["expert_size"])
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    architecture, cfg = read_checkpoint_config(out)
    with torch.device("meta"):
        names = [(name, p.shape) for name, p in architecture.model(cfg).named_parameters()]
    generator = torch.Generator().manual_seed(0)
    shard, shard_bytes, weight_map = {}, 0, {}

    def flush() -> None:
        nonlocal shard, shard_bytes
        file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        shard, shard_bytes = {}, 0

    for name, size in names:
        shard[name] = (torch.randn(size, generator=generator) * 0.02).to(torch.bfloat16)
        shard_bytes += shard[name].numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for file in small.iterdir():
        file.unlink()
    small.rmdir()
    return out


def measure(checkpoint: Path, tokens: int) -> dict:
    """Seconds and peak RSS of a fresh process that loads the checkpoint (and runs a forward when ``tokens``)."""
    code = (
        "import json, resource, time, torch\n"
        "from llada_onnx.models.checkpoint import load_model\n"
        "from llada_onnx.models.registry import read_checkpoint_config\n"
        "start = time.perf_counter()\n"
        f"model = load_model({str(checkpoint)!r}, dtype=torch.bfloat16)\n"
        "seconds = {'load': time.perf_counter() - start}\n"
        f"if {tokens}:\n"
        f"    mask_id = read_checkpoint_config({str(checkpoint)!r})[1].special_ids()['mask_token_id']\n"
        f"    ids = torch.full((1, {tokens}), mask_id)\n"
        "    start = time.perf_counter()\n"
        "    with torch.no_grad():\n"
        "        finite = bool(torch.isfinite(model(ids, torch.ones_like(ids)).float()).all())\n"
        "    seconds['forward'] = time.perf_counter() - start\n"
        "    assert finite\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print(json.dumps({'seconds': seconds, 'peak_rss_mb': peak}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load_memory", description=__doc__.split("\n")[0])
    p.add_argument("--work", default=".bench")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--out", default="bench/results/load-memory-moe-7b")
    a = p.parse_args(argv)
    checkpoint = Path(a.work) / "moe-7b-streamed" / "checkpoint"
    if not (checkpoint / "model.safetensors.index.json").is_file():
        print(f"[bench] writing the checkpoint to {checkpoint}", file=sys.stderr)
        write_checkpoint(checkpoint)
    weights_gb = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) / 1e9
    load, forward = measure(checkpoint, 0), measure(checkpoint, a.tokens)
    rows = [["load_model (bf16)", f"{load['seconds']['load']:.1f}", f"{load['peak_rss_mb']:,.0f}"],
            [f"load_model + forward of {a.tokens} tokens", f"{sum(forward['seconds'].values()):.1f}",
             f"{forward['peak_rss_mb']:,.0f}"]]
    lines = [f"checkpoint: {weights_gb:.2f} GB of bf16 weights", "",
             *table(["process", "seconds", "peak RSS MB"], rows)]
    report = {"machine": machine(), "weights_gb": weights_gb, "load": load, "forward": forward, "tokens": a.tokens}
    save_report(Path(a.out), report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
