"""Latency of one KV-cached step against one full forward, per canvas length (Fast-dLLM's block-wise cache).

    python -m bench.cache_step --models 8b --config config.json --provider cuda --fusion ort --lengths 384,1088
    python -m bench.cache_step --export A --export B --rounds 4 --provider cuda --lengths 1088   # A against B

For each canvas length L (batch 1, a 64-token prompt, block 32 at the start of the generated span) it times,
medians over ``--reps`` calls after warm-up: the exact graph's full forward (predictions for the block), a cache
refresh (full forward that also returns every layer's keys/values), a dual-cache step (the 32 block tokens
against the cache) and a prefix-cache step (the block and everything after it). On CUDA inputs and the cache
are bound on the device (IOBinding), as the runtime does, and cached steps are replayed as CUDA graphs (the
runtime's default); the dual step is also timed without them, and with ``--profile`` its kernels are recorded
(``bench.kernel_profile``). The ratio step / full forward bounds the
end-to-end gain: with s steps per block, a block costs one refresh and s - 1 cached steps.

Several ``--export`` directories are compared in one process (their sessions built once), alternating in
``--rounds`` rounds whose order flips each round, so that a shared machine's drift falls on all of them alike;
the report adds each export's medians over the rounds and their ratios to the first export's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from llada_onnx.runtime import Pipeline
from llada_onnx.runtime.kv_cache import KVCacheSession

from . import kernel_profile
from .report import pyplot, save_report, table
from .harness import machine, prepare_model

PROMPT, BLOCK = 64, 32


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(pipe: Pipeline, length: int, reps: int, uncaptured: KVCacheSession | None, profile: bool) -> dict:
    vocab = pipe.manifest.vocab_size
    canvas = np.random.default_rng(0).integers(0, min(vocab, 1000), size=(1, length))
    canvas[:, PROMPT:] = pipe.manifest.id("mask_token_id")
    mask = np.ones_like(canvas)
    window = np.arange(PROMPT, PROMPT + BLOCK, dtype=np.int64)[None]
    cache = pipe.kv_cache
    _, kv = cache.refresh(canvas, mask, window, logits=False)

    def dual_step():
        return cache.step(canvas, mask, PROMPT, PROMPT + BLOCK, window, kv, logits=False)

    row = {"length": length,
           "full_forward_ms": timed(lambda: pipe.graph.run(canvas, mask, window), reps),
           "refresh_ms": timed(lambda: cache.refresh(canvas, mask, window, logits=False), reps),
           "dual_step_ms": timed(dual_step, reps),
           "prefix_step_ms": timed(lambda: cache.step(canvas, mask, PROMPT, length, window, kv, logits=False), reps)}
    if uncaptured is not None:
        _, plain_kv = uncaptured.refresh(canvas, mask, window, logits=False)
        row["dual_step_uncaptured_ms"] = timed(lambda: uncaptured.step(canvas, mask, PROMPT, PROMPT + BLOCK, window,
                                                                       plain_kv, logits=False), reps)
    if profile:
        row["dual_step_profile"] = kernel_profile.profile(dual_step)
    row["dual_step_fraction"] = row["dual_step_ms"] / row["full_forward_ms"]
    row["prefix_step_fraction"] = row["prefix_step_ms"] / row["full_forward_ms"]
    return row


TIMES = ("full_forward_ms", "refresh_ms", "dual_step_ms", "dual_step_uncaptured_ms", "prefix_step_ms")


def medians(rows: list[dict]) -> list[dict]:
    """Each export's and length's medians over the rounds, with their ratios to the first export's."""
    keys = [k for k in TIMES if k in rows[0]]
    out = []
    for export in dict.fromkeys(r["export"] for r in rows):
        for length in dict.fromkeys(r["length"] for r in rows):
            mine = [r for r in rows if r["export"] == export and r["length"] == length]
            out.append({"export": export, "length": length, "rounds": len(mine),
                        **{k: statistics.median(r[k] for r in mine) for k in keys}})
    for m in out:
        first = next(f for f in out if f["length"] == m["length"])
        m["vs_first"] = {k: m[k] / first[k] for k in keys}
    return out


def markdown(report: dict) -> str:
    where = report["machine"].get("gpu") if report["provider"] == "cuda" else report["machine"]["processor"]
    threads = f" ({report['threads']} threads)" if report.get("threads") else ""
    several = len(report["rows"]) > len({r["length"] for r in report["rows"]})
    lines = [f"{report['model']} ({report['parameters'] / 1e6:,.0f}M parameters), {report['provider']}, "
             f"fusion {report.get('fusion', 'none')}, {where}{threads}, batch 1, block {BLOCK}, "
             f"medians of {report['reps']}:", ""]
    keys = [k for k in TIMES if k in report["rows"][0]]
    headers = {"full_forward_ms": "full forward ms", "refresh_ms": "refresh ms", "dual_step_ms": "dual-cache step ms",
               "dual_step_uncaptured_ms": "dual step without CUDA graphs ms", "prefix_step_ms": "prefix-cache step ms"}
    lines += table([*(["export, round"] if several else []), "canvas length", *(headers[k] for k in keys),
                    "dual / full", "prefix / full"],
                   [[*([f"{r['export']}, {r['round']}"] if several else []), r["length"],
                     *(f"{r[k]:.2f}" for k in keys), f"{r['dual_step_fraction']:.3f}",
                     f"{r['prefix_step_fraction']:.3f}"] for r in report["rows"]])
    if several:
        lines += ["", "Medians over the rounds (in brackets: against the first export):", ""]
        lines += table(["export", "canvas length", *(headers[k] for k in keys)],
                       [[m["export"], m["length"], *(f"{m[k]:.2f} ({m['vs_first'][k]:.2f}x)" for k in keys)]
                        for m in report["medians"]])
    for r in report["rows"]:
        if "dual_step_profile" in r:
            lines += ["", f"Dual-cache step of {r['export']} at canvas {r['length']}, replayed. "
                      + kernel_profile.markdown({"llada-onnx dual-cache step": r["dual_step_profile"]},
                                                {"llada-onnx dual-cache step": r["dual_step_ms"]})]
    return "\n".join(lines) + "\n"


def chart(report: dict):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    exports = list(dict.fromkeys(m["export"] for m in report["medians"]))
    for export in exports:
        mine = [m for m in report["medians"] if m["export"] == export]
        for key, label in (("full_forward_ms", "full forward"), ("refresh_ms", "refresh"),
                           ("prefix_step_ms", "prefix-cache step"), ("dual_step_ms", "dual-cache step")):
            ax.plot([m["length"] for m in mine], [m[key] for m in mine], "o-",
                    label=f"{export}: {label}" if len(exports) > 1 else label)
    ax.set_xlabel("canvas length")
    ax.set_ylabel("ms per model call")
    ax.set_title(f"{report['model']}, {report['provider']}")
    ax.legend()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cache_step", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="default", help="one of default, tiny, 100m, 8b")
    p.add_argument("--n-layers", type=int, help="override the 8b shape's layer count")
    p.add_argument("--config", help="config.json giving the 8b shape")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--fusion", choices=("none", "ort"), default="none",
                   help="export fusion of both graphs (--models; an --export has its own)")
    p.add_argument("--lengths", default="384,1088")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--export", action="append",
                   help="time this export (made with --cache) instead of the --models one (repeatable: compared)")
    p.add_argument("--rounds", type=int, default=1, help="rounds over the exports, alternating their order")
    p.add_argument("--threads", type=int, help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--profile", action="store_true", help="also record the dual step's CUDA kernels (CUPTI)")
    p.add_argument("--work", default=".bench")
    p.add_argument("--out", default="bench/results/cache-step")
    a = p.parse_args(argv)
    if a.profile:
        kernel_profile.require_cuda(a.provider)
    if a.export:
        dirs = [Path(e) for e in a.export]
        names = [d.name if [e.name for e in dirs].count(d.name) == 1 else str(d) for d in dirs]
    else:
        model = prepare_model(a.models, Path(a.work), a.provider, a.config, [a.fusion],
                              a.n_layers if a.models == "8b" else None, cache=True)
        dirs, names = [model.onnx[a.fusion]], [model.name]
    pipes = [Pipeline.from_pretrained(d, provider=a.provider, threads=a.threads) for d in dirs]
    first = pipes[0].manifest
    lengths = [int(n) for n in a.lengths.split(",") if int(n) <= first.max_sequence_length]
    uncaptured = [KVCacheSession(pipe.manifest, "cuda", cuda_graphs=False) if a.provider == "cuda" else None
                  for pipe in pipes]
    rows = []
    for round_ in range(1, a.rounds + 1):
        order = range(len(pipes)) if round_ % 2 else reversed(range(len(pipes)))
        for i in order:
            rows += [{"export": names[i], "round": round_,
                      **measure(pipes[i], n, a.reps, uncaptured[i], a.profile and round_ == 1)} for n in lengths]
    report = {"model": ", ".join(names),
              "parameters": first.raw["model"]["parameters"], "provider": a.provider, "threads": a.threads,
              "fusion": first.raw.get("fusion", "none"), "reps": a.reps, "machine": machine(),
              "rows": rows, "medians": medians(rows)}
    save_report(Path(a.out), report, markdown(report), chart, "latency.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
