"""Runtime vs torch reference sampler on one checkpoint, same settings, alternating repetitions, medians.

    python bench/sampler_speed.py --checkpoint CKPT --onnx EXPORT [--gen 64 --steps 64 --block 32 --batch 1]

Prints a JSON report: wall time per generation for each engine, the runtime/torch ratio, the runtime's time
inside ``session.run`` vs on the host, and whether the outputs were token-identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--onnx", required=True)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--provider", default="cpu")
    a = p.parse_args()

    from llada_onnx.models import LLaDAModel, generate
    from llada_onnx.runtime import Pipeline

    if a.threads:
        torch.set_num_threads(a.threads)
    model = LLaDAModel.from_pretrained(a.checkpoint)
    pipe = Pipeline.from_pretrained(a.onnx, provider=a.provider, threads=a.threads)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, size=(a.batch, a.prompt_len))
    kw = dict(steps=a.steps, gen_length=a.gen, block_length=a.block)

    session_time = []
    real_run = pipe.graph.run

    def timed_run(*args, **kwargs):
        t = time.perf_counter()
        out = real_run(*args, **kwargs)
        session_time[-1] += time.perf_counter() - t
        return out

    pipe.graph.run = timed_run
    torch_t, ort_t, ort_session = [], [], []
    same = True
    for rep in range(a.reps + 1):  # the first repetition warms both engines up and is not counted
        t = time.perf_counter()
        ref = generate(model, torch.from_numpy(ids), **kw).numpy()
        t_torch = time.perf_counter() - t
        session_time.append(0.0)
        t = time.perf_counter()
        out = pipe.generate_ids(ids, **kw)
        t_ort = time.perf_counter() - t
        same &= bool(np.array_equal(ref, out))
        if rep:
            torch_t.append(t_torch)
            ort_t.append(t_ort)
            ort_session.append(session_time[-1])
    med = statistics.median
    report = {
        "settings": dict(kw, batch=a.batch, prompt_len=a.prompt_len, reps=a.reps, provider=pipe.provider),
        "torch_s": med(torch_t), "runtime_s": med(ort_t), "speedup": med(torch_t) / med(ort_t),
        "runtime_session_s": med(ort_session),
        "runtime_host_fraction": 1 - med(ort_session) / med(ort_t),
        "tokens_per_s": {"torch": a.batch * a.gen / med(torch_t), "runtime": a.batch * a.gen / med(ort_t)},
        "token_identical": same,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
