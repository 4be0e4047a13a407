"""LLaDA2's block step, torch against the runtime, in one process: what a block of block diffusion costs.

    python -m bench.block_step --config bench/configs/llada2-mini.json --export DIR --provider cuda --batches 1,4

The canvas holds ``--prompt`` tokens and ``--gen`` masks (blocks of 32); both calls predict its last block:

- **step**: the block's 32 tokens against the keys/values of every block before it (the exact block cache: what
  each step of the runtime's sampler runs);
- **forward**: the whole canvas up to the block (what each step of the official, uncached code runs).

Engines: the project's torch model from the checkpoint (bf16 on CUDA, fp32 on the CPU; experts stacked as the
exporter stacks them), eagerly and under ``torch.compile`` (each ``--compile`` mode, ``dynamic=False``), its step
fed the cache its own prefill made; the runtime: each ``--export``'s graph through ``GraphSession``, the calls the
sampler makes (cache on the device on CUDA). Engines alternate round by round; medians of ``--reps``.

Tokens per second follow from the step time: a step commits every masked position above the threshold, so
``tokens/s = batch x tokens-per-step / step time``, given at ``--tokens-per-step`` (the LLaDA2 reports' 2.6 to
5.3) and at the rate ``--measure-rate EXPORT`` measures (the sampler's defaults on that export).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .harness import engine_arguments, machine, model_checkpoint, time_engines
from .report import ms_chart, save_report, table

BLOCK = 32


def canvas(batch: int, prompt: int, gen: int, mask_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Ids ``[batch, prompt + gen]`` (random prompt, masks after it), its mask, and where the last block starts."""
    ids = np.random.default_rng(0).integers(0, 1000, size=(batch, prompt + gen))
    ids[:, prompt:] = mask_id
    return ids, np.ones_like(ids), prompt + gen - BLOCK


def torch_model(ckpt: Path, device: str):
    import torch

    from llada_onnx.models import load_model

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return load_model(ckpt, dtype=dtype, device=device).eval().fuse_projections()


def torch_engines(model, device: str, modes: list[str], ids: np.ndarray, mask: np.ndarray, start: int) -> dict:
    """``{name: call}``: the forward and the cached step, eager and compiled."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t_ids, t_mask = (torch.from_numpy(a).to(device) for a in (ids, mask))
    block = torch.arange(start, start + BLOCK, device=device).expand(len(ids), BLOCK)
    with torch.no_grad():
        past = model.hidden_states(t_ids[:, :start], t_mask[:, :start], BLOCK)[1]

    def forward():
        return model(t_ids, t_mask, block, block_length=BLOCK)

    def step():
        return model.lm_head(model.hidden_states(t_ids[:, start:], t_mask[:, start:], BLOCK, past,
                                                 t_mask[:, :start])[0])

    def timed(fn):
        @torch.no_grad()
        def call():
            fn()
            sync()
        return call

    label = str(next(model.parameters()).dtype).removeprefix("torch.")
    calls = {f"torch {label} eager {what}": timed(fn) for what, fn in (("step", step), ("forward", forward))}
    for mode in modes:
        for what, fn in (("step", step), ("forward", forward)):
            compiled = torch.compile(fn, dynamic=False, mode=None if mode == "default" else mode)
            calls[f"torch {label} compile ({mode}) {what}"] = timed(compiled)
    return calls


def runtime_engines(graphs: dict, ids: np.ndarray, mask: np.ndarray, start: int) -> dict:
    """``{name: call}`` for each export's graph (``{export dir: GraphSession}``): the cached step as the sampler
    runs it (the cache from the export's own prefill call) and the uncached forward."""
    calls = {}
    batch = len(ids)
    block = np.ascontiguousarray(np.broadcast_to(np.arange(start, start + BLOCK), (batch, BLOCK)))
    head = np.ascontiguousarray(block - start)
    fed = np.ascontiguousarray(ids[:, start:])
    for export, graph in graphs.items():
        name = f"llada-onnx {graph.manifest.variant} {graph.manifest.dtype} ({export.name})"
        _, past = graph.run_block(np.ascontiguousarray(ids[:, :start]), np.ascontiguousarray(mask[:, :start]),
                                  head[:, :1], BLOCK, np.zeros((batch, 0), np.int64), graph.past.empty(batch),
                                  logits=False)
        fed_mask, cached_mask = np.ascontiguousarray(mask[:, start:]), np.ascontiguousarray(mask[:, :start])
        calls[f"{name} step"] = lambda g=graph, p=past: g.run_block(fed, fed_mask, head, BLOCK, cached_mask, p,
                                                                    logits=False, presents=False)
        calls[f"{name} forward"] = lambda g=graph: g.run(ids, mask, block, block_length=BLOCK)
    return calls


def measured_rate(export: Path) -> float:
    """Tokens committed per model call by the sampler's defaults on ``export`` (64-token prompt, 256 generated)."""
    from llada_onnx.runtime import Pipeline

    pipe, calls = Pipeline.from_pretrained(export), []
    out = pipe.generate_ids(np.arange(1, 65)[None], gen_length=256, callback=calls.append)
    return float((out[0, 64:] != pipe.manifest.id("mask_token_id")).sum() / len(calls))


def markdown(report: dict) -> str:
    where = report["machine"].get("gpu") if report["device"] == "cuda" else report["machine"]["processor"]
    lines = [f"{report['model']}, {report['device']} ({where}), canvas {report['length']}, predicting its last "
             f"{BLOCK}-token block, medians of {report['reps']}:", ""]
    rows = []
    for batch, result in report["results"].items():
        for name in [n for n in result if n.endswith(" step")]:
            engine = name.removesuffix(" step")
            step, forward = result[name], result.get(f"{engine} forward", {})
            base = next((n for n in result if "compile" in n and n.endswith(" step") and "ms" in result[n]), None)
            ms = lambda r: f"{r['ms']:.2f}" if "ms" in r else "failed: " + r.get("error", "-")  # noqa: E731
            ratio = f"{step['ms'] / result[base]['ms']:.2f}x" if base and "ms" in step else "-"
            rates = [f"{batch * rate / step['ms'] * 1000:,.0f}" if "ms" in step else "-"
                     for rate in report["tokens_per_step"]]
            rows.append([batch, engine, ms(step), ms(forward), ratio, *rates])
    rates = [f"tok/s at {r:g}/step" for r in report["tokens_per_step"]]
    lines += table(["batch", "engine", "step ms", "forward ms", "step vs first compile", *rates], rows)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.block_step", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="bench/configs/llada2-mini.json", help="the LLaDA2 config.json to draw")
    p.add_argument("--n-layers", type=int, help="override the config's layer count")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--tokens-per-step", default="2.6,5.3")
    p.add_argument("--measure-rate", help="an export whose sampler's tokens per step to report too")
    engine_arguments(p, "bench/results/block-step")
    a = p.parse_args(argv)
    from llada_onnx.models import read_checkpoint_config

    device = "cuda" if a.provider == "cuda" else "cpu"
    ckpt = model_checkpoint("llada2", Path(a.work), a.config, a.n_layers)
    architecture, cfg = read_checkpoint_config(ckpt)
    rates = [float(r) for r in a.tokens_per_step.split(",") if r]
    if a.measure_rate:
        rates.insert(0, round(measured_rate(Path(a.measure_rate)), 2))
    from llada_onnx.runtime.manifest import Manifest
    from llada_onnx.runtime.session import GraphSession

    model = None if a.no_torch else torch_model(ckpt, device)
    graphs = {Path(e): GraphSession(Manifest.load(e), a.provider, threads=a.threads) for e in a.export}
    results = {}
    for batch in (int(b) for b in a.batches.split(",")):
        ids, mask, start = canvas(batch, a.prompt, a.gen, cfg.mask_token_id)
        engines = {} if model is None else torch_engines(model, device, [m for m in a.compile.split(",") if m],
                                                         ids, mask, start)
        engines.update(runtime_engines(graphs, ids, mask, start))
        results[batch] = time_engines(engines, warmup=a.warmup, reps=a.reps)
        del engines
    report = {"model": f"LLaDA2 {Path(a.config).stem} ({architecture.parameter_count(cfg) / 1e9:.2f}B parameters, "
                       f"{cfg.num_hidden_layers} layers)", "device": a.provider, "length": a.prompt + a.gen,
              "reps": a.reps, "tokens_per_step": rates, "machine": machine(), "results": results}
    save_report(Path(a.out), report, markdown(report), lambda r: ms_chart(r, "ms per call", log=True),
                "block-step.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
