"""The server under load: continuous batching against one request at a time, at several client counts.

    python -m bench.serve --clients 1,4,16 --requests 4 --max-tokens 64 --out bench/results/serve-cpu

For each mode, a fresh ``llada-onnx serve`` (embedded default model unless ``--model``) on 127.0.0.1: ``batching``
with ``--max-batch`` rows per model call, and ``sequential`` with ``--max-batch 1`` (the same server, one
request in the model at a time). ``C`` client threads each send ``--requests`` streaming completions one after the
other (prompts in turn from a fixed list, temperature 0) through the OpenAI client. Reported per mode and client
count: generated tokens per second over all clients (``usage.completion_tokens`` / wall time), request latency
p50/p95, and time to the first streamed text (the first final token) p50/p95. Writes ``report.json``,
``report.md`` and ``throughput.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .harness import machine
from .report import pyplot, save_report, table

PROMPTS = ["ROMEO.", "JULIET.", "Enter HAMLET.", "What light", "KING. Speak", "My lord,", "O", "First Citizen."]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    def client_run(index: int) -> list[dict]:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        out = []
        for r in range(requests):
            start, first, tokens = time.perf_counter(), None, 0
            stream = client.completions.create(model="x", prompt=PROMPTS[(index + r) % len(PROMPTS)],
                                               max_tokens=max_tokens, stream=True,
                                               stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text and first is None:
                    first = time.perf_counter() - start
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            out.append({"latency": time.perf_counter() - start, "first": first, "tokens": tokens})
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = [r for rs in pool.map(client_run, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    latencies = [r["latency"] for r in done]
    firsts = [r["first"] for r in done if r["first"] is not None]
    return {"clients": clients, "requests": len(done), "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in done) / wall,
            "latency_p50_s": statistics.median(latencies), "latency_p95_s": percentile(latencies, 0.95),
            "first_token_p50_s": statistics.median(firsts), "first_token_p95_s": percentile(firsts, 0.95)}


def markdown(report: dict) -> str:
    lines = [f"`{report['command']}`: {report['model']} on {report.get('provider', 'cpu')}, "
             f"{report['max_tokens']} tokens a request, "
             f"{report['requests']} requests per client, streaming, temperature 0.", ""]
    rows = []
    sequential = {r["clients"]: r for r in report["modes"]["sequential"]}
    for mode, results in report["modes"].items():
        for r in results:
            gain = r["tokens_per_s"] / sequential[r["clients"]]["tokens_per_s"] if r["clients"] in sequential else None
            rows.append([mode, r["clients"], f"{r['tokens_per_s']:.1f}", f"{gain:.2f}x" if gain else "-",
                         f"{r['latency_p50_s']:.2f} / {r['latency_p95_s']:.2f}",
                         f"{r['first_token_p50_s']:.2f} / {r['first_token_p95_s']:.2f}"])
    lines += table(["mode", "clients", "tokens/s (all clients)", "vs sequential", "latency p50 / p95 s",
                    "first text p50 / p95 s"], rows)
    return "\n".join(lines) + "\n"


def chart(report: dict):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, results in report["modes"].items():
        ax.plot([r["clients"] for r in results], [r["tokens_per_s"] for r in results], "o-", label=mode)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("generated tokens/s, all clients")
    ax.set_xscale("log", base=2)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="export directory (default: the embedded model)")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after the other")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int)
    p.add_argument("--out", default="bench/results/serve-cpu")
    a = p.parse_args(argv)
    from llada_onnx.serve.process import LocalServer

    extra = ((["--model", a.model] if a.model else []) + (["--threads", str(a.threads)] if a.threads else [])
             + ["--provider", a.provider])
    modes = {}
    for mode, batch in (("batching", a.max_batch), ("sequential", 1)):
        server = LocalServer("--max-batch", str(batch), "--max-queue", "1024", *extra)
        try:
            load(server.url, 1, 1, a.max_tokens)  # warm-up
            modes[mode] = []
            for clients in (int(c) for c in a.clients.split(",")):
                result = load(server.url, clients, a.requests, a.max_tokens)
                print(f"[bench] {mode} {result}", file=sys.stderr, flush=True)
                modes[mode].append(result)
        finally:
            server.stop()
    report = {"command": "python -m bench.serve " + " ".join(sys.argv[1:] if argv is None else argv),
              "model": a.model or "embedded default model", "provider": a.provider, "max_tokens": a.max_tokens,
              "requests": a.requests,
              "machine": machine(), "modes": modes}
    save_report(Path(a.out), report, markdown(report), chart, "throughput.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
