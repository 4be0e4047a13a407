"""How fast a dual-cache step can be on this device, whatever the runtime: the yardstick for ``bench.cache_step``.

    python -m bench.step_floor --config config.json --device cuda [--length 1088] [--compile]

Builds the model of ``--config`` (e.g. the 8B one) with random weights directly on the device, float16 on CUDA
and float32 on the CPU, joins its projections as the exporter does, and times at one canvas length (batch 1,
a 64-token prompt, block 32; medians over ``--reps``):

- torch's full forward, predicting the block: the denominator of the step / full ratio;
- the step's matrix products alone (every projection of every layer and the LM head over the 32 block
  tokens): the weight-bound floor of any implementation that keeps these weights;
- the dual-cache step itself (``LLaDAModel.cached_hidden_states``, the algorithm the exported cache graph
  encodes) in torch's eager kernels;
- with ``--compile``, that step compiled by ``torch.compile`` (Inductor fuses the norms, rotary, softmax and
  activation into a few generated kernels; ``--compile-mode max-autotune-no-cudagraphs`` also tunes the GEMMs).

On CUDA every step variant is replayed as a CUDA graph, as the runtime replays its steps, so launch overhead is
out of the comparison; with ``--profile`` the steps' kernels are recorded too (``bench.kernel_profile``), to set
beside ``bench.cache_step --profile``. Needs torch (the ``torch`` extra, or a CUDA build of torch on a GPU machine).
The prompt and block are ``bench.cache_step``'s, whose runtime figures these compare with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from .cache_step import BLOCK, PROMPT, timed
from . import kernel_profile
from .report import pyplot, save_report, table
from .harness import machine


def _graphed(fn, device: str):
    """``fn`` captured once as a CUDA graph, returned as its replay (on the CPU, ``fn`` itself)."""
    import torch

    if device != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graphs asks
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(config: dict, *, device: str, length: int, reps: int, compile_mode: str | None,
            profile: bool = False) -> dict:
    import torch

    from llada_onnx.models import LLaDAConfig
    from llada_onnx.models.modeling import LLaDAModel

    cfg = LLaDAConfig.from_dict(config)
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LLaDAModel(cfg).eval().fuse_projections()
    finally:
        torch.set_default_dtype(default)
    t = model.model.transformer
    ids = torch.randint(0, min(cfg.vocab_size, 1000), (1, length), device=device)
    mask = torch.ones_like(ids)
    block = torch.arange(PROMPT, PROMPT + BLOCK, device=device)[None]
    fed = ids[:, PROMPT:PROMPT + BLOCK].contiguous()
    x = torch.randn(1, BLOCK, cfg.d_model, device=device, dtype=dtype)
    x_mlp = torch.randn(1, BLOCK, cfg.mlp_hidden_size, device=device, dtype=dtype)
    with torch.no_grad():
        empty = torch.zeros(1, cfg.n_kv_heads, 0, cfg.head_dim, device=device, dtype=dtype)
        cache = model.cached_hidden_states(ids, mask, torch.arange(length, device=device)[None],
                                           [(empty, empty)] * cfg.n_layers)[1]

    @torch.no_grad()
    def full():
        return model(ids, mask, block, always_mask=True)

    @torch.no_grad()
    def step():
        return model.lm_head(model.cached_hidden_states(fed, mask, block, cache)[0])

    @torch.no_grad()
    def products():
        for b in t.blocks:
            b.qkv_proj(x), b.attn_out(x), b.gate_up_proj(x), b.ff_out(x_mlp)
        return model.lm_head(x)

    def synced(fn):  # CUDA runs asynchronously: a call is timed up to its last kernel
        return (lambda: (fn(), torch.cuda.synchronize())) if device == "cuda" else fn

    steps = {"step_products_ms": synced(_graphed(products, device)), "dual_step_ms": synced(_graphed(step, device))}
    row = {"full_forward_ms": timed(synced(full), reps), **{k: timed(fn, reps) for k, fn in steps.items()}}
    if compile_mode is not None:
        compiled = torch.compile(step, dynamic=False, mode=None if compile_mode == "default" else compile_mode)
        start = time.perf_counter()
        synced(compiled)()
        row["compile_s"] = time.perf_counter() - start
        steps["dual_step_compiled_ms"] = synced(_graphed(compiled, device))
        row["dual_step_compiled_ms"] = timed(steps["dual_step_compiled_ms"], reps)
    if profile:
        labels = dict(VARIANTS)
        row["profiles"] = {labels[k]: kernel_profile.profile(fn) for k, fn in steps.items()}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"model": dataclasses.asdict(cfg), "parameters": sum(p.numel() for p in model.parameters()),
            "weight_bytes": weights, "dtype": str(dtype).removeprefix("torch."), "length": length, **row}


VARIANTS = (("full_forward_ms", "full forward (eager)"), ("step_products_ms", "step: matrix products only"),
            ("dual_step_ms", "dual-cache step, eager kernels"), ("dual_step_compiled_ms", "dual-cache step, compiled"))


def markdown(report: dict) -> str:
    r = report["result"]
    where = report["machine"].get("gpu") or report["machine"]["processor"]
    lines = [f"{report['parameters'] / 1e6:,.0f}M parameters ({r['n_layers']} layers), {r['dtype']}, "
             f"{report['device']} ({where}), canvas {r['length']}, batch 1, block {BLOCK}, medians of "
             f"{report['reps']}" + ("; step variants replayed as CUDA graphs" if report["device"] == "cuda" else "")
             + (f"; compile mode {report['compile_mode']}" if report["compile_mode"] else "") + ":", ""]
    lines += table(["what", "ms", "/ full forward"],
                   [[label, f"{r[key]:.2f}", f"{r[key] / r['full_forward_ms']:.3f}"]
                    for key, label in VARIANTS if key in r])
    if "profiles" in r:
        wall = {label: r[key] for key, label in VARIANTS if key in r}
        lines += ["", kernel_profile.markdown(r["profiles"], wall)]
    return "\n".join(lines) + "\n"


def chart(report: dict):
    plt = pyplot()
    r = report["result"]
    shown = [(label, r[key]) for key, label in VARIANTS if key in r]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh([label for label, _ in shown][::-1], [ms for _, ms in shown][::-1])
    ax.set_xlabel("ms per model call")
    ax.set_title(f"canvas {r['length']}, {report['device']}")
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.step_floor", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="config.json giving the model shape (e.g. LLaDA-8B's)")
    p.add_argument("--n-layers", type=int, help="override the config's layer count")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--length", type=int, default=1088)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--compile", dest="compile_mode", nargs="?", const="default", default=None,
                   help="also time the step compiled by torch.compile (optionally naming its mode)")
    p.add_argument("--profile", action="store_true", help="also record the steps' CUDA kernels (CUPTI)")
    p.add_argument("--out", default="bench/results/step-floor")
    a = p.parse_args(argv)
    if a.profile:
        kernel_profile.require_cuda(a.device)
    config = json.loads(Path(a.config).read_text())
    if a.n_layers:
        config["n_layers"] = a.n_layers
    if a.length <= PROMPT + BLOCK:
        raise SystemExit(f"--length must exceed the {PROMPT}-token prompt and the {BLOCK}-token block")
    result = measure(config, device=a.device, length=a.length, reps=a.reps, compile_mode=a.compile_mode,
                     profile=a.profile)
    result["n_layers"] = result["model"]["n_layers"]
    report = {"parameters": result["parameters"], "device": a.device, "reps": a.reps,
              "compile_mode": a.compile_mode, "machine": machine(), "result": result}
    save_report(Path(a.out), report, markdown(report), chart, "step_floor.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
