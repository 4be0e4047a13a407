"""The exact sampler's benchmark: the torch reference sampler vs the llada-onnx runtime, in one process and run.

    python -m bench.run                                    # CPU: tiny + ~100M models, the standard settings
    python -m bench.run --models 8b --provider cuda --config bench/configs/llada-8b-instruct/config.json \
        --compile default,reduce-overhead
    python -m bench.run --models tiny --settings 16 --batches 1 --reps 2 --out /tmp/smoke   # the CI smoke test

For every model, setting (gen length = steps, block 32) and batch size, each engine generates from the same
random prompt; repetitions alternate between the engines after one short uncounted warm-up generation each, and
the medians are reported: wall time per generation, tokens/s, per-step time split into model time (``session.run`` for the
runtime, the model's forward for torch) and host time (everything else in the sampler loop), the peak RSS of the
process while that engine ran, and on CUDA the peak device memory. Ratios are runtime/torch in the same run,
against torch eager and against the fastest torch engine (``--compile`` adds the same model under each
``torch.compile`` mode; tokens are compared with eager torch's).
A separate process then runs the runtime alone to measure the RSS a generation really needs (goal: at most the
export's size + 1 GB). Writes ``report.json``, ``report.md`` and ``tokens_per_s.png`` to ``--out``.

Models are built on first use under ``--work`` (random weights, peaked logits, real vocabulary): ``tiny`` is the
test suite's shape, ``100m`` 6 layers of d_model 384, ``8b`` the shape of ``--config``; ``default`` is the embedded
Shakespeare model. On CUDA torch runs in bf16 (as LLaDA is released) and the export is fp16.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import numpy as np

from .harness import (RuntimeEngine, TorchEngine, export_bytes, machine, measure_case, prepare_model,
                      runtime_alone_rss)
from .report import pyplot, save_report, table


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m.get('gpu') or m['processor']}, {m['cpus']} cores; onnxruntime {m['onnxruntime']}, "
             f"torch {m.get('torch')}; provider {report['provider']}; medians of {report['reps']}; block 32, "
             f"prompt {report['cases'][0]['prompt_length'] if report['cases'] else '-'} tokens, temperature 0.",
             ""]
    lines += table(
        ["model", "gen / steps", "batch", "engine", "s / generation", "tokens/s", "step ms (model + host)", "host",
         "vs torch", "vs best torch", "peak RSS MB", "tokens = torch"],
        [[f"{c['model']} ({c['parameters'] / 1e6:,.0f}M)", f"{c['gen_length']} / {c['steps']}", c["batch"],
          f"{name} {e['dtype']}", f"{e['wall_s']:.2f}", f"{e['tokens_per_s']:.1f}",
          f"{e['step_ms']:.2f} ({e['model_step_ms']:.2f} + {e['host_step_ms']:.2f})", f"{100 * e['host_fraction']:.1f}%",
          f"{e['speedup_vs_torch']:.2f}x", f"{e['speedup_vs_best_torch']:.2f}x", f"{e['peak_rss_mb']:,.0f}",
          f"{100 * e['token_agreement_vs_torch']:.1f}%"]
         for c in report["cases"] for name, e in c["engines"].items()])
    if report.get("memory"):
        lines += ["", "Runtime alone (a fresh process that loads the export and generates once, at the largest "
                  "setting):", ""]
        lines += table(["model", "export MB", "peak RSS MB", "RSS - export MB"],
                       [[mem["model"], f"{mem['export_mb']:,.0f}", f"{mem['peak_rss_mb']:,.0f}",
                         f"{mem['peak_rss_mb'] - mem['export_mb']:,.0f}"] for mem in report["memory"]])
    return "\n".join(lines) + "\n"


def chart(report: dict):
    plt = pyplot()

    cases = report["cases"]
    labels = [f"{c['model']}\ngen {c['gen_length']}, b{c['batch']}" for c in cases]
    x = np.arange(len(cases))
    engines = list(cases[0]["engines"])
    width = 0.8 / len(engines)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cases)), 4))
    for i, engine in enumerate(engines):
        ax.bar(x + (i - (len(engines) - 1) / 2) * width, [c["engines"][engine]["tokens_per_s"] for c in cases],
               width, label=engine)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("generated tokens / s (log)")
    ax.set_title(f"exact sampler, {report['provider']}: "
                 f"{report['machine'].get('gpu') or str(report['machine']['cpus']) + ' CPU cores'}")
    ax.legend()
    return fig


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,100m", help="comma list of tiny, 100m, moe-2l, 8b, default")
    p.add_argument("--settings", default="128,256", help="generation lengths (steps = length, block 32)")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its choice)")
    p.add_argument("--config", help="config.json giving the 8b shape")
    p.add_argument("--n-layers", type=int, help="override the 8b shape's layer count (same width, fewer layers)")
    p.add_argument("--fusion", default="none", help="comma list of export fusions to run: none, ort")
    p.add_argument("--compile", default="", help="comma list of torch.compile modes to time beside torch eager "
                                                  "(default, reduce-overhead, max-autotune)")
    p.add_argument("--work", default=".bench", help="where generated checkpoints and exports are kept")
    p.add_argument("--out", default="bench/results/cpu", help="report.json, report.md and tokens_per_s.png go here")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the runtime-alone RSS process")
    a = p.parse_args(argv)
    gens = [int(g) for g in a.settings.split(",")]
    batches = [int(b) for b in a.batches.split(",")]
    work, out = Path(a.work), Path(a.out)
    device = "cuda" if a.provider == "cuda" else "cpu"

    report = {"provider": a.provider, "reps": a.reps, "machine": machine(), "command": " ".join(sys.argv),
              "cases": [], "memory": []}
    fusions = a.fusion.split(",")
    for name in a.models.split(","):
        model = prepare_model(name, work, a.provider, a.config, fusions, a.n_layers if name == "8b" else None)
        eager = TorchEngine(model, device)
        engines = ([eager] + [eager.compiled(mode) for mode in a.compile.split(",") if mode]
                   + [RuntimeEngine(model, f, a.provider, a.threads) for f in fusions])
        for gen in gens:
            for batch in batches:
                case = measure_case(engines, model, gen, batch, a.prompt_length, a.reps)
                report["cases"].append(case)
                for engine in engines[1:]:
                    r = case["engines"][engine.name]
                    print(f"[bench] {model.name} gen {gen} batch {batch} {engine.name}: {r['speedup_vs_torch']:.2f}x "
                          f"torch ({r['speedup_vs_best_torch']:.2f}x the fastest torch engine), host {100 * r['host_fraction']:.1f}%, step {r['step_ms']:.2f} ms (torch "
                          f"{case['engines']['torch']['step_ms']:.2f}), tokens = torch "
                          f"{100 * r['token_agreement_vs_torch']:.1f}%", file=sys.stderr, flush=True)
        del engines
        if a.memory:
            onnx = model.onnx[fusions[0]]
            rss = runtime_alone_rss(onnx, a.provider, max(gens), max(batches), a.prompt_length)
            report["memory"].append({"model": model.name, "export_mb": export_bytes(onnx) / 2**20,
                                     "peak_rss_mb": rss, "gen_length": max(gens), "batch": max(batches)})
    report["peak_rss_process_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    save_report(out, report, markdown(report), chart, "tokens_per_s.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
