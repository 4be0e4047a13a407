"""One full forward of the exact sampler, torch against the runtime, in one process: the GPU yardstick.

    python -m bench.forward --models moe-7b --export DIR --provider cuda --batches 1,4 --compile default,reduce-overhead

The canvas is the exact sampler's (``--length`` tokens: a 64-token prompt, the rest masked) and each engine
predicts the positions of one 32-token block, as a step of the sampler does:

- torch eager: the project's torch model from the checkpoint (bf16 on CUDA, fp32 on the CPU), experts stacked
  once as the exporter stacks them, ``model(ids, mask, block)``;
- torch.compile of that call, once per ``--compile`` mode (``dynamic=False``; a mode that fails to compile is
  reported with its error instead of a time);
- the runtime: each ``--export``'s graph through ``GraphSession.run``, the sampler's own call (inputs bound on the
  device on CUDA), there both replayed as a CUDA graph (the default) and launched kernel by kernel.

Engines alternate round by round; medians of ``--reps`` after ``--warmup`` calls. With ``--profile`` (CUDA),
each engine's kernels are then recorded over a few calls and grouped by what they do (``bench.kernel_profile``).
Writes ``report.json``, ``report.md`` and ``forward.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from . import kernel_profile
from .harness import engine_arguments, machine, model_checkpoint, time_engines
from .report import ms_chart, save_report, table

PROMPT, BLOCK = 64, 32


def torch_calls(ckpt: Path, device: str, modes: list[str]) -> dict:
    """``{engine name: (fn(ids, mask, block) -> None)}`` for torch eager and each compile mode."""
    import torch

    from llada_onnx.models import load_model

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_model(ckpt, dtype=dtype, device=device).eval().fuse_projections()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    label = str(dtype).removeprefix("torch.")

    def runner(fn):
        @torch.no_grad()
        def call(ids, mask, block):
            fn(ids, mask, block, always_mask=True)
            sync()
        return call

    calls = {f"torch {label} eager": runner(model)}
    for mode in modes:
        calls[f"torch {label} compile ({mode})"] = runner(
            torch.compile(model, dynamic=False, mode=None if mode == "default" else mode))
    return calls


def runtime_calls(exports: list[Path], provider: str, threads: int | None) -> dict:
    """``{engine name: fn(ids, mask, block)}`` per export; on CUDA each twice, replayed as a CUDA graph (the
    runtime's default) and run kernel by kernel."""
    from llada_onnx.runtime import Pipeline

    calls = {}
    for export in exports:
        for graphs in (True, False) if provider == "cuda" else (False,):
            pipe = Pipeline.from_pretrained(export, provider=provider, threads=threads, cuda_graphs=graphs)
            name = f"llada-onnx {pipe.manifest.variant} {pipe.manifest.dtype} ({export.name})"
            name += ", CUDA graph" if graphs else (", no CUDA graph" if provider == "cuda" else "")
            calls[name] = lambda ids, mask, block, graph=pipe.graph: graph.run(ids, mask, block)
    return calls


def measure(torch_side: dict, runtime_side: dict, *, vocab: int, mask_id: int, batch: int, length: int,
            device: str, warmup: int, reps: int, profile: bool = False) -> dict:
    """Median ms per engine at one batch size, and with ``profile`` its kernel profile; an engine that raises is
    reported with its error."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(vocab, 1000), size=(batch, length))
    ids[:, PROMPT:] = mask_id
    mask = np.ones_like(ids)
    block = np.broadcast_to(np.arange(PROMPT, PROMPT + BLOCK), (batch, BLOCK)).copy()
    inputs = {}
    if torch_side:
        import torch

        inputs["torch"] = tuple(torch.from_numpy(a).to(device) for a in (ids, mask, block))
    inputs["runtime"] = (ids, mask, block)
    engines = {**{n: (lambda f=f: f(*inputs["torch"])) for n, f in torch_side.items()},
               **{n: (lambda f=f: f(*inputs["runtime"])) for n, f in runtime_side.items()}}
    results = time_engines(engines, warmup=warmup, reps=reps)
    if profile:
        for name, fn in engines.items():
            if "ms" in results[name]:
                results[name]["profile"] = kernel_profile.profile(fn)
    return results


def markdown(report: dict) -> str:
    """One table; the ratio column is against the first torch.compile mode that ran (the baseline that counts on
    a GPU), else against the first engine."""
    where = report["machine"].get("gpu") if report["device"] == "cuda" else report["machine"]["processor"]
    lines = [f"{report['model']}, {report['device']} ({where}),"
             f" canvas {report['length']} (prompt {PROMPT}), predicting a {BLOCK}-token block, medians of "
             f"{report['reps']}:", ""]
    rows, bases = [], set()
    for batch, result in report["results"].items():
        ran = {n: r["ms"] for n, r in result.items() if "ms" in r}
        base = next((n for n in ran if "compile" in n), next(iter(ran), None))
        bases.add(base)
        for name, r in result.items():
            ratio = f"{r['ms'] / ran[base]:.2f}x" if "ms" in r else "-"
            rows.append([batch, name, f"{r['ms']:.2f}" if "ms" in r else "failed: " + r["error"], ratio])
    lines += table(["batch", "engine", "ms / forward", f"vs {' / '.join(sorted(b for b in bases if b))}"], rows)
    for batch, result in report["results"].items():
        profiled = {n: r for n, r in result.items() if "profile" in r}
        if profiled:
            lines += ["", f"Batch {batch}. " + kernel_profile.markdown({n: r["profile"] for n, r in profiled.items()},
                                                                     {n: r["ms"] for n, r in profiled.items()})]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.forward", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="moe-7b", help="benchmark model name (see bench.harness) for torch's side")
    p.add_argument("--config", help="config.json for --models 8b")
    p.add_argument("--length", type=int, default=320)
    p.add_argument("--n-layers", type=int, help="the model's depth cut to this many layers (torch's side)")
    p.add_argument("--profile", action="store_true", help="also record each engine's CUDA kernels (CUPTI)")
    engine_arguments(p, "bench/results/forward")
    a = p.parse_args(argv)
    if a.profile:
        kernel_profile.require_cuda(a.provider)
    from llada_onnx.models import read_checkpoint_config

    device = "cuda" if a.provider == "cuda" else "cpu"
    ckpt = model_checkpoint(a.models, Path(a.work), a.config, a.n_layers)
    architecture, cfg = read_checkpoint_config(ckpt)
    modes = [m for m in a.compile.split(",") if m]
    torch_side = {} if a.no_torch else torch_calls(ckpt, device, modes)
    runtime_side = runtime_calls([Path(e) for e in a.export], a.provider, a.threads)
    vocab, mask_id = architecture.sizes(cfg).vocab_size, cfg.special_ids()["mask_token_id"]
    results = {b: measure(torch_side, runtime_side, vocab=vocab, mask_id=mask_id, batch=b,
                          length=a.length, device=device, warmup=a.warmup, reps=a.reps,
                          profile=a.profile)
               for b in (int(x) for x in a.batches.split(","))}
    report = {"model": f"{a.models} ({architecture.parameter_count(cfg) / 1e6:,.0f}M parameters)",
              "device": a.provider, "length": a.length, "reps": a.reps, "machine": machine(), "results": results}
    save_report(Path(a.out), report, markdown(report), lambda r: ms_chart(r, "ms per forward"), "forward.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
