"""Where a GPU call's time goes: its CUDA kernels, grouped by what they do, per call.

CUPTI (through ``torch.profiler``) records every kernel the process launches, onnxruntime's as well as torch's and
those replayed from CUDA graphs, so the runtime and torch.compile are profiled the same way. A profile answers
the question a timing cannot: whether a gap to torch is kernel time (and in which kernels) or launch gaps
(wall time minus the summed kernel time). Used by ``bench.forward``, ``bench.cache_step`` and
``bench.step_floor`` with ``--profile``; CUDA only.
"""

from __future__ import annotations

import re

from .report import table

# First match wins. Names as cuBLAS / CUTLASS (gemm, xmma, nvjet), cuDNN's and torch's attention (sdpa, flash,
# fmha), onnxruntime's CUDA kernels (_SplitKernel, _BinaryElementWise, ...) and Inductor (triton_*) call them.
CATEGORIES = (
    ("attention", r"sdpa|flash|fmha|attention|attn"),
    ("matrix products", r"gemm|xmma|nvjet|cutlass|splitkreduce"),
    ("torch.compile fused (Inductor)", r"^triton_"),
    ("split / concat / slice / copy", r"split|concat|slice|gather|scatter|transpose|copy|memcpy|memset|expand"),
    ("casts", r"cast"),
    ("norms", r"norm"),
    ("rotary", r"rotary"),
    ("softmax / reductions", r"softmax|reduce|topk|argmax"),
    ("elementwise", r"elementwise|binary|unary|silu|sigmoid|mul|add|where"),
)
TOP = 15


def require_cuda(device: str) -> None:
    if device != "cuda":
        raise SystemExit("--profile records CUDA kernels: use it with the cuda provider / device")


def category(kernel: str) -> str:
    name = kernel.lower()
    return next((label for label, pattern in CATEGORIES if re.search(pattern, name)), "other")


def profile(fn, calls: int = 5) -> dict:
    """Kernel time of ``fn()`` (a warm, synchronising call) per call: ``{"busy_ms", "kernels", "categories":
    {label: {"ms", "kernels"}}, "top": [{"name", "category", "ms", "kernels"}]}``."""
    import torch
    from torch.profiler import ProfilerActivity

    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()  # the whole device: onnxruntime's streams too
    kernels = []
    for entry in prof.key_averages():
        us = getattr(entry, "self_device_time_total", None)
        us = entry.self_cuda_time_total if us is None else us
        if us > 0:
            kernels.append({"name": entry.key, "category": category(entry.key), "ms": us / 1000 / calls,
                            "kernels": entry.count / calls})
    kernels.sort(key=lambda k: -k["ms"])
    categories: dict[str, dict] = {}
    for k in kernels:
        c = categories.setdefault(k["category"], {"ms": 0.0, "kernels": 0.0})
        c["ms"] += k["ms"]
        c["kernels"] += k["kernels"]
    return {"calls": calls, "busy_ms": sum(k["ms"] for k in kernels),
            "kernels": sum(k["kernels"] for k in kernels),
            "categories": dict(sorted(categories.items(), key=lambda kv: -kv[1]["ms"])), "top": kernels[:TOP]}


def markdown(profiles: dict[str, dict], wall_ms: dict[str, float] | None = None) -> str:
    """Engines side by side: kernel ms per call by category (kernels per call in brackets), the sum, and where
    ``wall_ms`` gives the engine's timed median, the time no kernel ran (launch gaps); then each engine's top
    kernels."""
    names = list(profiles)
    labels = sorted({c for p in profiles.values() for c in p["categories"]},
                    key=lambda c: -max(p["categories"].get(c, {"ms": 0})["ms"] for p in profiles.values()))

    def cell(p, c):
        got = p["categories"].get(c)
        return f"{got['ms']:.2f} ({got['kernels']:.0f})" if got else "-"

    rows = [[c, *(cell(profiles[n], c) for n in names)] for c in labels]
    rows.append(["**all kernels**", *(f"**{profiles[n]['busy_ms']:.2f}** ({profiles[n]['kernels']:.0f})"
                                      for n in names)])
    if wall_ms:
        rows.append(["timed call (median)", *(f"{wall_ms[n]:.2f}" if n in wall_ms else "-" for n in names)])
        rows.append(["no kernel running", *(f"{wall_ms[n] - profiles[n]['busy_ms']:.2f}" if n in wall_ms else "-"
                                            for n in names)])
    lines = ["Kernel time per call, ms (kernels per call), CUPTI:", ""]
    lines += table(["kernels", *names], rows)
    for n in names:
        lines += ["", f"Top kernels, {n}:", ""]
        lines += table(["kernel", "what", "ms / call", "per call"],
                       [[f"`{k['name'][:90]}`", k["category"], f"{k['ms']:.3f}", f"{k['kernels']:.0f}"]
                        for k in profiles[n]["top"]])
    return "\n".join(lines) + "\n"
