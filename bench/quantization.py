"""Quantized exports measured: file size, RAM to load, time per step, agreement with the float graph, held-out loss.

    python -m bench.quantization --heldout .train/data/heldout.npy       # default + 100m models, this machine's CPU
    python -m bench.quantization --models 8b --config config.json --variants fp32-int4-b32 --threads 16
    python -m bench.quantization --models 8b --config config.json --variants fp16,fp16-int4-b32 --fusion ort \\
        --provider cuda

Variants are ``DTYPE[-METHOD[-bBLOCK]][-keephead][-accN]``: ``fp32``, ``fp32-int8``, ``fp32-int4-b32``,
``fp32-int4-b128``, ``fp16-int4-b32``, ``fp32-int4-b32-acc4`` (``MatMulNBits`` computing in int8: AVX-512 VNNI / AMX),
... Each is made once under ``--work``: quantized from the float export of the same dtype when
that is on disk (``llada-onnx quantize``), else exported from the checkpoint with ``--quantize`` (validation on).
Then, per variant:

* size: graph + weight files;
* load RSS: peak RSS of a fresh process that opens the session and runs one step (the host RAM it needs);
* time per step: one forward of the standard canvas (prompt 64 + gen 256 tokens, the positions of one 32-token
  block, only ``top_ids``/``top_prob`` fetched, through the runtime's session) at batch 1 and 4; variants
  alternate, one uncounted call first, medians; intra-op threads do not spin-wait (see :func:`no_spinning`);
* agreement: ``top_ids`` against the first (float) variant at the masked positions of evaluation canvases
  (held-out chunks for the default model, random ids half masked otherwise), and the export validation's figure;
* held-out masked-token loss (the default model, with ``--heldout``): ``models.train.masked_token_loss`` on the
  variant's logits, the same masks as the training report.

Writes ``report.json``, ``report.md`` and ``quantization.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .report import pyplot, save_report, table
from .harness import machine, model_checkpoint

PROMPT, GEN, BLOCK = 64, 256, 32


def parse_variant(name: str):
    """``fp32-int4-b128-keephead-acc4`` -> ("fp32", Quantization("int4", block_size=128, accuracy_level=4,
    keep_head=True))."""
    from llada_onnx.export import Quantization

    parts = name.split("-")
    dtype = parts.pop(0)
    keep = "keephead" in parts
    level = next((int(p[3:]) for p in parts if p.startswith("acc") and p[3:].isdigit()), 0)
    parts = [p for p in parts if p != "keephead" and not p.startswith("acc")]
    if dtype not in ("fp32", "fp16") or len(parts) > 2 or (parts and parts[0] not in ("int8", "int4")):
        raise SystemExit(f"bad variant {name!r}: use DTYPE[-int8|-int4[-bBLOCK]][-keephead][-accN], e.g. "
                         "fp32-int4-b32")
    if not parts:
        return dtype, Quantization()
    block = int(parts[1][1:]) if len(parts) == 2 else 32
    return dtype, Quantization(parts[0], block_size=block, accuracy_level=level, keep_head=keep)


def prepare(name: str, variant: str, ckpt: Path, work: Path, fusion: str, provider: str) -> Path:
    from llada_onnx.export import export
    from llada_onnx.export.quantize import quantize_export
    from llada_onnx.runtime import default_onnx_dir

    dtype, quantization = parse_variant(variant)
    device = "cuda" if provider == "cuda" else "cpu"
    base = work / (ckpt.parent.name if name != "default" else "default")
    float_dir = base / f"onnx-{dtype}-{fusion}"  # the name bench.run gives the same export
    if name == "default" and dtype == "fp32" and fusion == "none":
        float_dir = default_onnx_dir()
    level = f"-acc{quantization.accuracy_level}" if quantization.accuracy_level else ""
    out = float_dir if quantization.method == "none" else base / f"onnx-{dtype}-{fusion}-{quantization.variant}{level}"
    if (out / "llada_onnx.json").is_file():
        return out
    print(f"[bench] making {name} {variant} in {out}", file=sys.stderr)
    if quantization.method != "none" and (float_dir / "llada_onnx.json").is_file():
        quantize_export(float_dir, out, quantization, device=device, force=True)
    else:
        export(ckpt, out, dtype=dtype, device=device, fusion=fusion, quantization=quantization, force=True)
    return out


def export_files_mb(onnx: Path) -> float:
    return sum(p.stat().st_size for p in onnx.iterdir() if p.suffix in (".onnx", ".data")) / 1e6


def load_rss_mb(onnx: Path, provider: str, threads: int | None) -> float:
    """Peak RSS (VmHWM) of a fresh process that opens the export and runs one step."""
    code = (
        "import numpy as np\n"
        "from llada_onnx.runtime.manifest import Manifest\n"
        "from llada_onnx.runtime.session import GraphSession\n"
        f"s = GraphSession(Manifest.load({str(onnx)!r}), {provider!r}, threads={threads!r})\n"
        f"ids = np.zeros((1, {PROMPT + GEN}), dtype=np.int64)\n"
        f"s.run(ids, np.ones_like(ids), np.arange({PROMPT}, {PROMPT + BLOCK})[None])\n"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1]) / 1024


def no_spinning():
    """Session options whose intra-op threads sleep when idle. Several sessions live in this process; with
    onnxruntime's default spin-waiting, the idle sessions' threads keep spinning after their call and take cores
    from the session being timed (measured on this 2-core machine: every variant 20-30% slower, unevenly)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def step_times(sessions: dict, mask_id: int, batches: list[int], reps: int) -> dict:
    """Median seconds of one step per variant and batch, variants alternating."""
    rng = np.random.default_rng(0)
    times = {v: {b: [] for b in batches} for v in sessions}
    for b in batches:
        ids = rng.integers(0, 1000, size=(b, PROMPT + GEN))
        ids[:, PROMPT:] = mask_id
        mask, positions = np.ones_like(ids), np.broadcast_to(np.arange(PROMPT, PROMPT + BLOCK), (b, BLOCK)).copy()
        for rep in range(reps + 1):
            for variant, session in sessions.items():
                start = time.perf_counter()
                session.run(ids, mask, positions)
                if rep:  # the first call of each shape warms arenas and kernels up
                    times[variant][b].append(time.perf_counter() - start)
    return {v: {b: statistics.median(t) for b, t in by_batch.items()} for v, by_batch in times.items()}


def evaluate(session, canvases: np.ndarray, masked: np.ndarray) -> np.ndarray:
    """``top_ids`` at the masked positions of each canvas."""
    out = []
    for ids, m in zip(canvases, masked):
        positions = np.nonzero(m)[0][None]
        out.append(session.run(ids[None], np.ones_like(ids[None]), positions).top_ids[0])
    return np.concatenate(out)


def measure_model(name: str, a, work: Path) -> dict:
    from llada_onnx.models.train import masked_token_loss
    from llada_onnx.runtime.manifest import Manifest
    from llada_onnx.runtime.session import GraphSession

    ckpt = model_checkpoint(name, work, a.config, a.n_layers if name == "8b" else None)
    dirs = {v: prepare(name, v, ckpt, work, a.fusion, a.provider) for v in a.variants.split(",")}
    manifests = {v: Manifest.load(d) for v, d in dirs.items()}
    mask_id = next(iter(manifests.values())).id("mask_token_id")
    sessions = {v: GraphSession(m, a.provider, threads=a.threads, session_options=no_spinning())
                for v, m in manifests.items()}
    steps = step_times(sessions, mask_id, [int(b) for b in a.batches.split(",")], a.reps)
    heldout = np.load(a.heldout) if a.heldout and name == "default" else None
    rng = np.random.default_rng(1)
    if heldout is not None:
        canvases = heldout[: 16 * 512].astype(np.int64).reshape(16, 512)
    else:
        canvases = rng.integers(0, 1000, size=(8, PROMPT + GEN))
    masked = rng.random(canvases.shape) < 0.5
    noisy = np.where(masked, mask_id, canvases)
    reference = None
    rows = {}
    for variant, session in sessions.items():
        file = dirs[variant] / "validation.json"  # absent for an export made with --no-validate
        validation = json.loads(file.read_text()) if file.is_file() else {}
        top = evaluate(session, noisy, masked) if len(sessions) > 1 else None
        reference = top if reference is None else reference
        row = {
            "variant": variant, "export": str(dirs[variant]), "size_mb": export_files_mb(dirs[variant]),
            "load_rss_mb": load_rss_mb(dirs[variant], a.provider, a.threads),
            "step_ms": {b: 1000 * s for b, s in steps[variant].items()},
            "agreement_vs_first": None if top is None else float((top == reference).mean()),
            "validation_agreement_vs_torch": validation.get("top_ids_agreement"),
            "validation_reference": validation.get("reference", "torch fp32"),
        }
        if heldout is not None:
            def logits(ids, session=session):
                every = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
                return session.run(ids, np.ones_like(ids), every, logits=True).logits
            row["heldout"] = masked_token_loss(logits, heldout, 512, mask_id, batch_size=8)
        rows[variant] = row
        print(f"[bench] {name} {variant}: {json.dumps(row)}", file=sys.stderr)
    first = next(iter(rows.values()))
    for row in rows.values():
        row["speedup_vs_first"] = {b: first["step_ms"][b] / ms for b, ms in row["step_ms"].items()}
        if "heldout" in row:
            row["loss_change_vs_first"] = (row["heldout"]["masked_token_loss"]
                                           / first["heldout"]["masked_token_loss"] - 1)
    params = manifests[next(iter(manifests))].raw["model"]["parameters"]
    label = name if name != "8b" or not a.n_layers else f"8b ({a.n_layers} layers)"
    return {"model": label, "parameters": params, "variants": list(rows.values())}


def markdown(report: dict) -> str:
    lines = [f"Quantized variants, {report['provider']} ({report['threads'] or 'default'} threads), one step at "
             f"length {PROMPT + GEN} (block of {BLOCK}), medians of {report['reps']}; `{report['command']}`", ""]
    rows = []
    for m in report["models"]:
        for r in m["variants"]:
            ms, up = r["step_ms"], r["speedup_vs_first"]
            cell = lambda d, b, f: f.format(d[b]) if b in d else "-"  # noqa: E731
            loss = (f"{r['heldout']['masked_token_loss']:.4f} ({r['loss_change_vs_first']:+.2%})"
                    if "heldout" in r else "-")
            agree, valid = ("-" if x is None else f"{x:.2%}"
                            for x in (r["agreement_vs_first"], r["validation_agreement_vs_torch"]))
            rows.append([m["model"], r["variant"], f"{r['size_mb']:.1f}", f"{r['load_rss_mb']:.0f}",
                         cell(ms, 1, "{:.1f}"), cell(ms, 4, "{:.1f}"),
                         f"{cell(up, 1, '{:.2f}x')} / {cell(up, 4, '{:.2f}x')}", agree, valid, loss])
    lines += table(["model", "variant", "size MB", "load RSS MB", "step ms b1", "step ms b4", "speed-up b1 / b4",
                    "agreement vs first", "validation agreement", "held-out loss (change)"], rows)
    return "\n".join(lines) + "\n"


def chart(report: dict):
    plt = pyplot()
    models = report["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        for r in m["variants"]:
            x = r["size_mb"]
            y = r["step_ms"].get(1) or next(iter(r["step_ms"].values()))
            ax.scatter(x, y)
            ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("export size (MB)")
        ax.set_ylabel("ms per step, batch 1")
        ax.set_title(m["model"])
        ax.grid(alpha=0.3)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="default,100m", help="comma list of default, tiny, 100m, 8b")
    p.add_argument("--variants", default="fp32,fp32-int8,fp32-int4-b32,fp32-int4-b128",
                   help="comma list; the first is the reference of the agreement and speed-up columns")
    p.add_argument("--config", help="config.json of the 8b shape")
    p.add_argument("--n-layers", type=int, help="8b: keep only this many layers")
    p.add_argument("--fusion", default="none", choices=("none", "ort"))
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--heldout", help="held-out tokens (.npy) of the default model's corpus recipe, for the loss")
    p.add_argument("--work", default=".bench")
    p.add_argument("--out", default="bench/results/quantization-cpu")
    a = p.parse_args(argv)
    report = {"command": "python -m bench.quantization " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine(), "provider": a.provider, "threads": a.threads, "reps": a.reps,
              "models": [measure_model(name, a, Path(a.work)) for name in a.models.split(",")]}
    save_report(Path(a.out), report, markdown(report), chart, "quantization.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
