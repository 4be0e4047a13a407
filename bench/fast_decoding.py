"""Fast decoding on the embedded default model: speed and what it costs in quality, against exact decoding.

    python -m bench.fast_decoding [--gens 128,256] [--reps 3] [--out bench/results/fast-decoding]
    python -m bench.fast_decoding --export DIR --prompts 2 ...   # any export made with --cache

Prompts are opening lines of the three plays held out of the default model's training (public domain). For each
policy (exact; threshold 0.9 / 0.8 / 0.7; factor 1.0) and generation length (block 32, temperature 0, batch 1,
early stop off so every policy produces the same number of tokens) it reports the median tokens/s over the
prompts, the speed-up over exact decoding counting only the time inside model calls (the ceiling if the
sampler's own work cost nothing), model calls per generated token, agreement with exact decoding (fraction of
generated positions with the same token), and the masked-token loss that the model assigns to each continuation
(mean cross-entropy of the generated tokens at masked positions, masking ratios t = 0.1 .. 0.9, fixed masks), in
nats: a policy that damages the text raises it. Writes ``report.json``, ``report.md`` and ``speed_quality.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from llada_onnx.runtime import Pipeline

from .report import pyplot, save_report, table

PROMPTS = [  # opening lines of the held-out plays (Julius Caesar, Macbeth, Twelfth Night)
    "FLAVIUS.\nHence! home, you idle creatures, get you home:\nIs this a holiday?",
    "MARULLUS.\nWherefore rejoice? What conquest brings he home?",
    "CAESAR.\nCalpurnia!",
    "FIRST WITCH.\nWhen shall we three meet again\nIn thunder, lightning, or in rain?",
    "DUNCAN.\nWhat bloody man is that? He can report,",
    "MACBETH.\nSo foul and fair a day I have not seen.",
    "DUKE.\nIf music be the food of love, play on,",
    "VIOLA.\nWhat country, friends, is this?",
]
RULES = {"exact": {}, "threshold 0.9": {"threshold": 0.9}, "threshold 0.8": {"threshold": 0.8},
         "threshold 0.7": {"threshold": 0.7}, "factor 1.0": {"factor": 1.0}}
CACHES = ("none", "dual", "prefix")
POLICIES = {(rule, cache): dict(kw, cache=cache) for rule, kw in RULES.items() for cache in CACHES}
RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)


def continuation_loss(pipe: Pipeline, canvas: np.ndarray, prompt_len: int, seed: int = 0) -> float:
    """Mean cross-entropy (nats) of the generated tokens at masked positions, over fixed masking ratios."""
    mask_id = pipe.manifest.id("mask_token_id")
    rng = np.random.default_rng(seed)
    gen = canvas.shape[1] - prompt_len
    total = count = 0.0
    for t in RATIOS:
        masked = rng.random(gen) < t
        if not masked.any():
            continue
        noisy = canvas.copy()
        noisy[0, prompt_len:][masked] = mask_id
        positions = (prompt_len + np.nonzero(masked)[0])[None].astype(np.int64)
        logits = pipe.graph.run(noisy, np.ones_like(noisy), positions, logits=True).logits[0].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
        target = canvas[0, positions[0]]
        total += float((log_z - logits[np.arange(len(target)), target]).sum())
        count += len(target)
    return total / count


def run(gens: list[int], reps: int, policies: dict = POLICIES, export: str | None = None,
        prompts: list[str] = PROMPTS, provider: str = "cpu") -> dict:
    """``policies`` must include ``("exact", "none")``, the baseline of the speed-ups; ``export``: an export made
    with ``--cache`` (default: the embedded model)."""
    pipe = Pipeline.from_pretrained(export, provider=provider)
    rows = []
    for gen in gens:
        samples = {name: {"wall": [], "model": [], "calls": [], "agree": [], "loss": []} for name in policies}
        for i, prompt in enumerate(prompts):
            ids, mask = pipe.codec.encode_batch([prompt], chat=False)
            outputs, walls, models, calls = {}, {name: [] for name in policies}, {name: [] for name in policies}, {}
            for _ in range(reps):  # policies alternate within each repetition
                for name, policy in policies.items():
                    # time inside the model calls: what the speed-up would be if the sampler's own work were free
                    in_model = []
                    start = time.perf_counter()
                    outputs[name] = pipe.generate_ids(ids, mask, gen_length=gen, steps=gen, block_length=32,
                                                      callback=lambda info: in_model.append(info.model_seconds),
                                                      **policy)
                    walls[name].append(time.perf_counter() - start)
                    models[name].append(sum(in_model))
                    calls[name] = len(in_model)
            exact = outputs[("exact", "none")][0, ids.shape[1]:]
            for name in policies:
                s = samples[name]
                s["wall"].append(statistics.median(walls[name]))
                s["model"].append(statistics.median(models[name]))
                s["calls"].append(calls[name] / gen)
                s["agree"].append(float((outputs[name][0, ids.shape[1]:] == exact).mean()))
                s["loss"].append(continuation_loss(pipe, outputs[name], ids.shape[1]))
        for name in policies:
            s = samples[name]
            rows.append({"rule": name[0], "cache": name[1], "gen_length": gen, "tokens_per_s": gen / statistics.median(s["wall"]),
                         "model_s": statistics.median(s["model"]),
                         "calls_per_token": statistics.mean(s["calls"]),
                         "agreement_with_exact": statistics.mean(s["agree"]),
                         "continuation_loss": statistics.mean(s["loss"])})
        exact = next(r for r in rows if r["gen_length"] == gen and (r["rule"], r["cache"]) == ("exact", "none"))
        for r in rows:
            if r["gen_length"] == gen:
                r["speedup_vs_exact"] = r["tokens_per_s"] / exact["tokens_per_s"]
                r["model_speedup_vs_exact"] = exact["model_s"] / r["model_s"]
    return {"rows": rows, "prompts": prompts, "reps": reps, "block_length": 32,
            "model": str(pipe.manifest.directory)}


def markdown(report: dict) -> str:
    lines = table(["gen", "rule", "KV cache", "tokens/s", "vs exact", "vs exact, model time only",
                   "model calls / token", "tokens = exact", "continuation loss (nats)"],
                  [[r["gen_length"], r["rule"], r["cache"], f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_exact']:.2f}x",
                    f"{r['model_speedup_vs_exact']:.2f}x",
                    f"{r['calls_per_token']:.3f}", f"{100 * r['agreement_with_exact']:.1f}%",
                    f"{r['continuation_loss']:.3f}"] for r in report["rows"]])
    return "\n".join(lines) + "\n"


def chart(report: dict):
    plt = pyplot()

    gens = sorted({r["gen_length"] for r in report["rows"]})
    fig, axes = plt.subplots(1, len(gens), figsize=(6 * len(gens), 4.5), squeeze=False)
    for ax, gen in zip(axes[0], gens):
        for cache, marker in zip(CACHES, "os^"):
            rows = [r for r in report["rows"] if r["gen_length"] == gen and r["cache"] == cache]
            ax.plot([r["speedup_vs_exact"] for r in rows], [r["continuation_loss"] for r in rows], marker,
                    label=f"KV cache: {cache}")
            for r in rows:
                ax.annotate(r["rule"], (r["speedup_vs_exact"], r["continuation_loss"]), fontsize=6,
                            xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel("tokens/s relative to exact decoding")
        ax.set_ylabel("continuation loss, nats (lower = likelier)")
        ax.set_title(f"default model, CPU, gen {gen}, block 32")
        ax.legend(fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fast_decoding", description=__doc__.split("\n")[0])
    p.add_argument("--gens", default="128,256")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rules", default=",".join(RULES), help="comma-separated subset of: " + ", ".join(RULES))
    p.add_argument("--caches", default=",".join(CACHES))
    p.add_argument("--export", help="an export made with --cache (default: the embedded model)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts")
    p.add_argument("--provider", default="cpu")
    p.add_argument("--out", default="bench/results/fast-decoding")
    a = p.parse_args(argv)
    rules, caches = a.rules.split(","), a.caches.split(",")
    policies = {(rule, cache): POLICIES[rule, cache] for rule in rules for cache in caches}
    if ("exact", "none") not in policies:
        p.error("--rules must include exact and --caches none: exact decoding without a cache is the baseline")
    report = run([int(g) for g in a.gens.split(",")], a.reps, policies, a.export, PROMPTS[:a.prompts], a.provider)
    save_report(Path(a.out), report, markdown(report), chart, "speed_quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
