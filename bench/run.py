"""The exact sampler's benchmark: the torch reference sampler vs the llada-onnx runtime, in one process and run.

    python -m bench.run                                    # CPU: tiny + ~100M models, the standard settings
    python -m bench.run --models 8b --provider cuda --config ../shared/reference/llada-8b-instruct/config.json
    python -m bench.run --models tiny --settings 16 --batches 1 --reps 2 --out /tmp/smoke   # the CI smoke test

For every model, setting (gen length = steps, block 32) and batch size, each engine generates from the same
random prompt; repetitions alternate between the engines after one short uncounted warm-up generation each, and
the medians are reported: wall time per generation, tokens/s, per-step time split into model time (``session.run`` for the
runtime, the model's forward for torch) and host time (everything else in the sampler loop), the peak RSS of the
process while that engine ran, and on CUDA the peak device memory. Ratios are runtime/torch in the same run.
A separate process then runs the runtime alone to measure the RSS a generation really needs (goal: at most the
export's size + 1 GB). Writes ``report.json``, ``report.md`` and ``tokens_per_s.png`` to ``--out``.

Models are built on first use under ``--work`` (random weights, peaked logits, real vocabulary): ``tiny`` is the
test suite's shape, ``100m`` 6 layers of d_model 384, ``8b`` the shape of ``--config``; ``default`` is the embedded
Shakespeare model. On CUDA torch runs in bf16 (as LLaDA is released) and the export is fp16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .report import pyplot, save_report, table

PRESETS = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4),
    "100m": dict(d_model=384, n_layers=6, n_heads=6),
}
BLOCK = 32


@dataclass
class Model:
    name: str
    checkpoint: Path
    onnx: dict[str, Path]  # fusion ("none" / "ort") -> export directory
    parameters: int


# ---------------------------------------------------------------------------------------------- models
def model_checkpoint(name: str, work: Path, config: str | None = None, n_layers: int | None = None) -> Path:
    """The checkpoint of benchmark model ``name``, written under ``work`` on first use (``default``: the shipped one)."""
    import torch

    from llada_onnx.models import LLaDAConfig, make_tiny_checkpoint
    from llada_onnx.runtime import default_checkpoint_dir

    if name == "default":
        return default_checkpoint_dir()
    ckpt = work / (name if n_layers is None else f"{name}-{n_layers}l") / "checkpoint"
    if not (ckpt / "config.json").is_file():
        if name == "8b":
            if not config:
                raise SystemExit("--models 8b needs --config path/to/the/8B/config.json")
            c = LLaDAConfig.from_dict(json.loads(Path(config).read_text()))
            shape = dict(d_model=c.d_model, n_layers=n_layers or c.n_layers, n_heads=c.n_heads,
                         n_kv_heads=c.n_kv_heads, mlp_hidden_size=c.mlp_hidden_size, vocab_size=c.vocab_size)
        elif name in PRESETS:
            shape = PRESETS[name]
        else:
            raise SystemExit(f"unknown model {name!r}: use tiny, 100m, 8b or default")
        print(f"[bench] writing the {name} checkpoint to {ckpt}", file=sys.stderr)
        # the 8B shape in bf16 as LLaDA ships (16 GB instead of 32: with its exports it fits a 64 GB disk)
        dtype = torch.bfloat16 if name == "8b" else torch.float32
        make_tiny_checkpoint(ckpt, max_shard_bytes=2 << 30, dtype=dtype, **shape)
    return ckpt


def prepare_model(name: str, work: Path, provider: str, config: str | None, fusions: list[str],
                  n_layers: int | None = None, cache: bool = False) -> Model:
    from llada_onnx.export import export
    from llada_onnx.models import read_checkpoint_config
    from llada_onnx.runtime import default_onnx_dir

    gpu = provider == "cuda"
    ckpt = model_checkpoint(name, work, config, n_layers)
    if name == "default" and fusions == ["none"]:  # shipped with its KV-cache graph
        onnx = {"none": default_onnx_dir()}
    else:
        base = work / (ckpt.parent.name if name != "default" else "default")
        onnx = {f: base / f"onnx-{'fp16' if gpu else 'fp32'}-{f}{'-cache' if cache else ''}" for f in fusions}
        for fusion, out in onnx.items():
            if not (out / "llada_onnx.json").is_file():
                print(f"[bench] exporting {name} to {out}", file=sys.stderr)
                export(ckpt, out, dtype="fp16" if gpu else "fp32", device="cuda" if gpu else "cpu", force=True,
                       fusion=fusion, cache=cache)
    label = name if n_layers is None else f"{name} ({n_layers} layers)"
    architecture, cfg = read_checkpoint_config(ckpt)
    return Model(label, ckpt, onnx, architecture.parameter_count(cfg))


def export_bytes(onnx: Path) -> int:
    return sum(p.stat().st_size for p in onnx.iterdir() if p.suffix in (".onnx", ".data"))


# ---------------------------------------------------------------------------------------------- probes
def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRss:
    """Samples this process's RSS every 5 ms while in use: ``ru_maxrss`` only ever grows, so it cannot tell
    which engine reached the peak."""

    def __enter__(self):
        self.peak, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


class Clock:
    """Accumulates the time spent inside the wrapped model call (after a device sync on CUDA)."""

    def __init__(self, sync=None):
        self.seconds, self.sync = 0.0, sync or (lambda: None)

    def wrap(self, fn):
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.seconds += time.perf_counter() - start
            return out
        return timed


class TorchEngine:
    name = "torch"

    def __init__(self, model: Model, device: str):
        import torch

        from llada_onnx.models import LLaDAModel, generate

        self.torch, self.generate = torch, generate
        self.device = device
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model = LLaDAModel.from_pretrained(model.checkpoint, dtype=dtype, device=device)
        self.dtype = str(dtype).removeprefix("torch.")
        self.sync = torch.cuda.synchronize if device == "cuda" else None

    def run(self, ids: np.ndarray, settings: dict):
        torch = self.torch
        clock = Clock(self.sync)
        model = self.model
        forward = model.forward
        model.forward = clock.wrap(forward)  # nn.Module.__call__ looks forward up on the instance
        try:
            with torch.no_grad():
                out = self.generate(model, torch.from_numpy(ids).to(self.device), **settings)
            if self.sync:
                self.sync()
        finally:
            del model.forward
        return out.cpu().numpy(), clock.seconds

    def device_peak_mb(self) -> float | None:
        if self.device != "cuda":
            return None
        return self.torch.cuda.max_memory_allocated() / 2**20


class RuntimeEngine:
    def __init__(self, model: Model, fusion: str, provider: str, threads: int | None):
        from llada_onnx.runtime import Pipeline

        self.name = "llada-onnx" if fusion == "none" else f"llada-onnx ({fusion} fusion)"
        self.pipe = Pipeline.from_pretrained(model.onnx[fusion], provider=provider, threads=threads)
        self.dtype = self.pipe.manifest.dtype

    def run(self, ids: np.ndarray, settings: dict):
        graph = self.pipe.graph
        clock = Clock()
        graph.run = clock.wrap(type(graph).run.__get__(graph))
        try:
            out = self.pipe.generate_ids(ids, **settings)
        finally:
            del graph.run
        return out, clock.seconds

    def device_peak_mb(self) -> float | None:
        return None  # onnxruntime exposes no peak for its CUDA arena; see the report's note


# ---------------------------------------------------------------------------------------------- measuring
def measure_case(engines, model: Model, gen: int, batch: int, prompt_len: int, reps: int) -> dict:
    settings = dict(gen_length=gen, steps=gen, block_length=min(BLOCK, gen))
    ids = np.random.default_rng(0).integers(0, 1000, size=(batch, prompt_len))
    samples = {e.name: {"wall": [], "model": [], "rss": []} for e in engines}
    outputs = {}
    warm = dict(gen_length=settings["block_length"], steps=settings["block_length"],
                block_length=settings["block_length"])
    for engine in engines:  # one short uncounted generation each: sessions, arenas and kernels warm up
        engine.run(ids, warm)
    for _ in range(reps):
        for engine in engines:
            with PeakRss() as rss:
                start = time.perf_counter()
                out, model_s = engine.run(ids, settings)
                wall = time.perf_counter() - start
            outputs[engine.name] = out
            samples[engine.name]["wall"].append(wall)
            samples[engine.name]["model"].append(model_s)
            samples[engine.name]["rss"].append(rss.peak)
    med = statistics.median
    result = {"model": model.name, "parameters": model.parameters, "gen_length": gen, "steps": gen,
              "block_length": settings["block_length"], "batch": batch, "prompt_length": prompt_len, "engines": {}}
    for engine in engines:
        s = samples[engine.name]
        wall, model_s = med(s["wall"]), med(s["model"])
        result["engines"][engine.name] = {
            "dtype": engine.dtype,
            "wall_s": wall,
            "tokens_per_s": batch * gen / wall,
            "step_ms": 1000 * wall / gen,
            "model_step_ms": 1000 * model_s / gen,
            "host_step_ms": 1000 * (wall - model_s) / gen,
            "host_fraction": (wall - model_s) / wall,
            "peak_rss_mb": max(s["rss"]),
            "peak_device_mb": engine.device_peak_mb(),
            "wall_s_all": s["wall"],
        }
    reference = outputs["torch"][:, prompt_len:]
    for engine in engines:
        entry = result["engines"][engine.name]
        entry["speedup_vs_torch"] = result["engines"]["torch"]["wall_s"] / entry["wall_s"]
        entry["token_agreement_vs_torch"] = float((outputs[engine.name][:, prompt_len:] == reference).mean())
    return result


def runtime_alone_rss(onnx: Path, provider: str, gen: int, batch: int, prompt_len: int) -> float:
    """Peak RSS (MB) of a fresh process that only loads the export and generates once."""
    code = (
        "import resource, numpy as np\n"
        "from llada_onnx.runtime import Pipeline\n"
        f"pipe = Pipeline.from_pretrained({str(onnx)!r}, provider={provider!r})\n"
        f"ids = np.random.default_rng(0).integers(0, 1000, size=({batch}, {prompt_len}))\n"
        f"pipe.generate_ids(ids, gen_length={gen}, steps={gen}, block_length={min(BLOCK, gen)})\n"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
    )  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so it would report this process's peak
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1]) / 1024


# ---------------------------------------------------------------------------------------------- output
def machine() -> dict:
    import onnxruntime

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "onnxruntime": onnxruntime.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m.get('gpu') or m['processor']}, {m['cpus']} cores; onnxruntime {m['onnxruntime']}, "
             f"torch {m.get('torch')}; provider {report['provider']}; medians of {report['reps']}; block 32, "
             f"prompt {report['cases'][0]['prompt_length'] if report['cases'] else '-'} tokens, temperature 0.",
             ""]
    lines += table(
        ["model", "gen / steps", "batch", "engine", "s / generation", "tokens/s", "step ms (model + host)", "host",
         "vs torch", "peak RSS MB", "tokens = torch"],
        [[f"{c['model']} ({c['parameters'] / 1e6:,.0f}M)", f"{c['gen_length']} / {c['steps']}", c["batch"],
          f"{name} {e['dtype']}", f"{e['wall_s']:.2f}", f"{e['tokens_per_s']:.1f}",
          f"{e['step_ms']:.2f} ({e['model_step_ms']:.2f} + {e['host_step_ms']:.2f})", f"{100 * e['host_fraction']:.1f}%",
          f"{e['speedup_vs_torch']:.2f}x", f"{e['peak_rss_mb']:,.0f}", f"{100 * e['token_agreement_vs_torch']:.1f}%"]
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
    p.add_argument("--models", default="tiny,100m", help="comma list of tiny, 100m, 8b, default")
    p.add_argument("--settings", default="128,256", help="generation lengths (steps = length, block 32)")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its choice)")
    p.add_argument("--config", help="config.json giving the 8b shape")
    p.add_argument("--n-layers", type=int, help="override the 8b shape's layer count (same width, fewer layers)")
    p.add_argument("--fusion", default="none", help="comma list of export fusions to run: none, ort")
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
        engines = [TorchEngine(model, device)] + [RuntimeEngine(model, f, a.provider, a.threads) for f in fusions]
        for gen in gens:
            for batch in batches:
                case = measure_case(engines, model, gen, batch, a.prompt_length, a.reps)
                report["cases"].append(case)
                for engine in engines[1:]:
                    r = case["engines"][engine.name]
                    print(f"[bench] {model.name} gen {gen} batch {batch} {engine.name}: {r['speedup_vs_torch']:.2f}x "
                          f"torch, host {100 * r['host_fraction']:.1f}%, step {r['step_ms']:.2f} ms (torch "
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
