"""The benchmarks' library: benchmark models and their exports, the torch and runtime engines, timing and memory
probes, and the machine description. The scripts beside it (``run``, ``fast_decoding``, ``cache_step``,
``quantization``, ``step_floor``) are thin: arguments, the cases to run, and their report.

The runtime's model time comes from its own step callback (``StepInfo.model_seconds``); the torch reference's from
a clock around its forward.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PRESETS = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4),
    "100m": dict(d_model=384, n_layers=6, n_heads=6),
}
# LLaDA-MoE-7B-A1B's real width, experts and vocabulary: with 2 of its 16 layers (1.5B parameters, 0.3B active),
# and the whole model (7.35B, written in bf16 as it ships: 14.7 GB)
_MOE_WIDTH = dict(d_model=2048, n_heads=16, num_experts=64, experts_per_token=8, expert_size=1024)
MOE_PRESETS = {"moe-2l": dict(_MOE_WIDTH, n_layers=2), "moe-7b": dict(_MOE_WIDTH, n_layers=16)}
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
    from llada_onnx.models.tiny import make_tiny_llada2_checkpoint, make_tiny_moe_checkpoint
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
        elif name == "llada2":  # random weights in a config.json's shape (the real mini: 16.25B, bf16 as it ships)
            if not config:
                raise SystemExit("--models llada2 needs --config (e.g. bench/configs/llada2-mini.json)")
            raw = json.loads(Path(config).read_text())
            raw["num_hidden_layers"] = n_layers or raw["num_hidden_layers"]
            print(f"[bench] writing the {name} checkpoint to {ckpt}", file=sys.stderr)
            gpu = torch.cuda.is_available()
            make_tiny_llada2_checkpoint(ckpt, config=raw, max_shard_bytes=5 << 30,
                                        dtype=torch.bfloat16 if gpu else torch.float32, device="cuda" if gpu else "cpu")
            return ckpt
        elif name in MOE_PRESETS:
            print(f"[bench] writing the {name} checkpoint to {ckpt}", file=sys.stderr)
            full = name == "moe-7b"
            make_tiny_moe_checkpoint(ckpt, max_shard_bytes=5 << 30 if full else 2 << 30, **MOE_PRESETS[name],
                                     dtype=torch.bfloat16 if full else torch.float32,
                                     device="cuda" if full and torch.cuda.is_available() else "cpu")
            return ckpt
        elif name in PRESETS:
            shape = PRESETS[name]
        else:
            raise SystemExit(f"unknown model {name!r}: use tiny, 100m, moe-2l, moe-7b, 8b, llada2 or default")
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


def time_engines(engines: dict, *, warmup: int, reps: int) -> dict:
    """``{name: {"ms": median}}`` of zero-argument calls, alternating engine by engine each round (shared, noisy
    machines: every engine sees the same conditions); an engine that raises during warm-up (a torch.compile mode
    that cannot handle the model) is reported with its error instead."""
    times: dict[str, list[float]] = {n: [] for n in engines}
    errors: dict[str, str] = {}
    for name, fn in engines.items():
        start = time.perf_counter()
        try:
            for _ in range(warmup):
                fn()
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        print(f"[bench] {name}: warm-up {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    for _ in range(reps):
        for name, fn in engines.items():
            if name not in errors:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: ({"error": errors[name]} if name in errors else {"ms": 1000 * statistics.median(times[name])})
            for name in engines}


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


def engine_arguments(p, out: str) -> None:
    """The arguments the engine-timing scripts share (exports, provider, batches, torch.compile modes, repetitions,
    folders); ``out``: the default results folder."""
    p.add_argument("--export", action="append", default=[], help="an export directory to time (repeatable)")
    p.add_argument("--provider", default="cuda")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: its choice)")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--compile", default="default,reduce-overhead",
                   help="torch.compile modes, comma-separated ('' for none)")
    p.add_argument("--no-torch", action="store_true", help="time the exports only")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--work", default=".bench", help="where generated checkpoints are kept")
    p.add_argument("--out", default=out, help="report.json, report.md and the chart go here")


class Clock:
    """Accumulates the time spent inside the wrapped torch forward (after a device sync on CUDA)."""

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
    """The torch reference sampler over the project's torch model (bf16 on CUDA, fp32 on the CPU), eager or, from
    :meth:`compiled`, with the model under ``torch.compile`` (``dynamic=False``: the exact sampler's canvas keeps
    its shape through a generation, and the warm-up compiles that shape)."""

    def __init__(self, model: Model, device: str):
        import torch

        from llada_onnx.models import generate, load_model

        self.torch, self.generate = torch, generate
        self.device, self.name, self.compiled_mode = device, "torch", None
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model = self.forward = load_model(model.checkpoint, dtype=dtype, device=device)
        self.dtype = str(dtype).removeprefix("torch.")
        self.sync = torch.cuda.synchronize if device == "cuda" else None

    def compiled(self, mode: str) -> "TorchEngine":
        """The same model (no second copy) under ``torch.compile`` in ``mode`` ("default", "reduce-overhead", ...)."""
        engine = copy.copy(self)
        engine.name, engine.compiled_mode = f"torch.compile ({mode})", mode
        engine.forward = self.torch.compile(self.model, dynamic=False, mode=None if mode == "default" else mode)
        return engine

    def run(self, ids: np.ndarray, settings: dict):
        clock = Clock(self.sync)
        with self.torch.no_grad():
            out = self.generate(_TimedModel(self.model.config, clock.wrap(self.forward)),
                                self.torch.from_numpy(ids).to(self.device), **settings)
        if self.sync:
            self.sync()
        return out.cpu().numpy(), clock.seconds

    def device_peak_mb(self) -> float | None:
        if self.device != "cuda":
            return None
        return self.torch.cuda.max_memory_allocated() / 2**20


class _TimedModel:
    """What the torch sampler needs of a model (its config, and calling it), the call timed."""

    def __init__(self, config, call):
        self.config, self._call = config, call

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)


class RuntimeEngine:
    def __init__(self, model: Model, fusion: str, provider: str, threads: int | None):
        from llada_onnx.runtime import Pipeline

        self.name = "llada-onnx" if fusion == "none" else f"llada-onnx ({fusion} fusion)"
        self.pipe = Pipeline.from_pretrained(model.onnx[fusion], provider=provider, threads=threads)
        self.dtype = self.pipe.manifest.dtype

    def run(self, ids: np.ndarray, settings: dict):
        seconds = []  # the runtime reports each step's time inside onnxruntime
        out = self.pipe.generate_ids(ids, callback=lambda info: seconds.append(info.model_seconds), **settings)
        return out, sum(seconds)

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
        engine.run(ids, settings if getattr(engine, "compiled_mode", None) else warm)  # compile the timed shape
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
    best_torch = min(e["wall_s"] for name, e in result["engines"].items() if name.startswith("torch"))
    for engine in engines:
        entry = result["engines"][engine.name]
        entry["speedup_vs_torch"] = result["engines"]["torch"]["wall_s"] / entry["wall_s"]
        entry["speedup_vs_best_torch"] = best_torch / entry["wall_s"]
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
