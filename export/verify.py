"""``llada-onnx verify``: prove on the user's own checkpoint and export that the ONNX deployment says what the torch
model says.

Two checks, on the user's prompts (or built-in ones) as one left-padded batch:

1. **Logits**: the torch model and :meth:`Pipeline.forward_logits` over every non-pad position: max and mean
   absolute error, top-1 agreement overall and on *decisive* positions (torch's top-2 margin above twice the
   tolerance, the export validation's rule).
2. **Sampler**: the torch reference sampler and the runtime side by side over a grid of settings (``quick``: 4;
   ``full``: the grid the test suite uses), the same seed feeding both. A block-diffusion export (LLaDA2) is
   compared with the torch block sampler over its own settings (:data:`BLOCK_GRIDS`), its logits at blocks of
   :data:`LOGITS_BLOCK_LENGTH`.

A float32 export of float weights must be exact: logits within 1e-4 of the logit scale, top-1 identical on
decisive positions, every grid case token-exact. An fp16 or quantized export changes the function on purpose, so
it is judged by decisive top-1 agreement and by the masked-token loss of the prompts (fixed masks at several
ratios) against torch's, within the tolerance stated in the report; its token agreement is reported, not judged.

Memory: torch runs first (every logits and reference output is computed), its model is freed, and only then is
the export loaded, so the two never occupy RAM together.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..models.checkpoint import load_model
from ..models.registry import read_checkpoint_config
from ..models.block_sampler import generate as block_generate
from ..models.sampler import generate
from ..runtime.block_settings import BlockSettings
from ..runtime.manifest import Manifest
from ..runtime.noise import Noise
from ..runtime.pipeline import Pipeline
from ..runtime.text import TextCodec
from .validate import FP16_MIN_AGREEMENT, FP32_RELATIVE_TOLERANCE

PROMPTS = ("The capital of France is", "Write a short poem about the sea.",
           "Question: what is 12 times 7? Answer:")
# (gen_length, block_length, steps): one to four blocks; steps per block below, equal to and above the block
# length. The test suite runs the same grid (tests/test_runtime.py).
SHAPES = ((8, 8, 8), (8, 4, 4), (12, 4, 6), (8, 2, 8), (16, 4, 16), (6, 3, 10), (4, 1, 4))
OPTIONS = ({}, {"cfg_scale": 1.0}, {"logits_eos_inf": True}, {"confidence_eos_eot_inf": True},
           {"confidence_eos_eot_inf_fixed": True}, {"remasking": "random"}, {"temperature": 0.7},
           {"temperature": 1.0, "cfg_scale": 0.5, "confidence_eos_eot_inf": True})
GRIDS = {
    "quick": (dict(gen_length=16, block_length=8, steps=16), dict(gen_length=8, block_length=4, steps=8, cfg_scale=1.0),
              dict(gen_length=8, block_length=4, steps=8, remasking="random"),
              dict(gen_length=8, block_length=4, steps=8, temperature=0.7)),
    "full": tuple([dict(zip(("gen_length", "block_length", "steps"), shape)) for shape in SHAPES]
                  + [dict(gen_length=8, block_length=4, steps=8, **o) for o in OPTIONS]),
}
# Block diffusion (LLaDA2): BlockSettings over two to four blocks; thresholds, editing, sampling; the cache off too.
BLOCK_GRIDS = {
    "quick": (dict(gen_length=16, block_length=8, steps=8), dict(gen_length=16, block_length=4, steps=4, threshold=0.5),
              dict(gen_length=16, block_length=8, steps=8, editing_threshold=0.5, max_post_steps=2),
              dict(gen_length=16, block_length=8, steps=8, temperature=1.0, top_k=50)),
    "full": tuple(dict(gen_length=16, **o) for o in (
        dict(block_length=8, steps=8), dict(block_length=8, steps=4, threshold=0.5),
        dict(block_length=4, steps=4, threshold=1.0), dict(block_length=16, steps=8, eos_early_stop=True),
        dict(block_length=8, steps=8, threshold=0.9, editing_threshold=0.5, max_post_steps=3),
        dict(block_length=8, steps=8, temperature=1.0, top_k=50, top_p=0.9), dict(block_length=8, steps=8,
                                                                                  cache="none"))),
}
LOGITS_BLOCK_LENGTH = 4  # the block length of the logits check of a block-diffusion export: causal across blocks
SEED = 3
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Masked-token loss of an approximate export against torch's: the most it may rise, relative.
LOSS_TOLERANCE = {"fp16": 0.01, "int8": 0.02, "int4": 0.05}
MASK_RATIOS = (0.15, 0.5, 0.85)


@dataclasses.dataclass
class Case:
    settings: dict[str, Any]
    torch_ids: np.ndarray | None = None
    runtime_ids: np.ndarray | None = None

    @property
    def name(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.settings.items())


def verify(checkpoint_dir: str | Path, export_dir: str | Path, *, prompts: list[str] | None = None,
           grid: str = "quick", provider: str = "cpu", device: str = "cpu", torch_dtype: str = "fp32",
           threads: int | None = None, say: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Run both checks; returns the report (``passed``, ``first_failure``, the figures of every check).

    ``torch_dtype="bf16"`` (on a GPU, for a large model) halves torch's memory; the reference is then no longer
    exact, so every export is judged as an approximate one."""
    manifest = Manifest.load(export_dir)
    architecture, cfg = read_checkpoint_config(checkpoint_dir)
    exact = manifest.dtype == "fp32" and manifest.variant == "exact" and torch_dtype == "fp32"
    codec = TextCodec.from_export(manifest)
    ids, mask = with_padded_row(*codec.encode_batch(list(prompts or PROMPTS), chat=False),
                                pad_id=manifest.id("pad_token_id"))
    block = manifest.block_diffusion
    options = {"block_length": LOGITS_BLOCK_LENGTH} if block else {"always_mask": True}
    cases = [Case(dict(settings)) for settings in (BLOCK_GRIDS if block else GRIDS)[grid]]
    dtype = TORCH_DTYPES[torch_dtype]
    model_gb = architecture.parameter_count(cfg) * torch.finfo(dtype).bits / 8 / 1e9
    export_gb = sum(p.stat().st_size for p in Path(export_dir).glob("*.data")) / 1e9
    say(f"torch: loading {checkpoint_dir} in {torch_dtype} on {device} ({model_gb:.2f} GB), then freeing it before "
        f"the export ({export_gb:.2f} GB of weights) is loaded: the two never share memory")

    model = load_model(checkpoint_dir, dtype=dtype, device=device)
    with torch.no_grad():
        reference = model(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device),
                          **options).float().cpu().numpy()
        # the loss check of an approximate export: torch's logits at fixed masks (not needed for an exact one)
        masked_inputs = [] if exact else _masked_inputs(ids, mask, manifest.id("mask_token_id"))
        reference_masked = [model(torch.from_numpy(x).to(device), torch.from_numpy(mask).to(device),
                                  **options).float().cpu().numpy() for x, _ in masked_inputs]
    for i, case in enumerate(cases):
        start = time.perf_counter()
        case.torch_ids = _reference_ids(model, ids, mask, case.settings, manifest, device, block)
        say(f"[torch {i + 1}/{len(cases)}] {case.name} ({time.perf_counter() - start:.1f} s)")
    del model
    gc.collect()

    pipe = Pipeline.from_pretrained(export_dir, provider=provider, threads=threads)
    block_length = options.get("block_length")
    logits = pipe.forward_logits(ids, mask, block_length=block_length)
    report = {"checkpoint": str(checkpoint_dir), "export": str(export_dir), "provider": pipe.provider,
              "torch": f"{torch_dtype} on {device}",
              "dtype": manifest.dtype, "variant": manifest.variant, "exact": exact, "grid": grid,
              "prompts": list(prompts or PROMPTS), "logits": _compare_logits(reference, logits, mask, exact)}
    if not exact:
        runtime_masked = [pipe.forward_logits(x, mask, block_length=block_length) for x, _ in masked_inputs]
        report["loss"] = _compare_loss(reference_masked, runtime_masked, ids, [m for _, m in masked_inputs],
                                       manifest)
    for i, case in enumerate(cases):
        case.runtime_ids = pipe.generate_ids(ids, mask, seed=SEED, **case.settings)
        same = bool(np.array_equal(case.torch_ids, case.runtime_ids))
        say(f"[runtime {i + 1}/{len(cases)}] {case.name}: {'token-exact' if same else 'DIFFERENT'}")
    report["cases"] = [{"settings": c.settings, "token_exact": bool(np.array_equal(c.torch_ids, c.runtime_ids)),
                        "token_agreement": float((c.torch_ids[:, ids.shape[1]:] == c.runtime_ids[:, ids.shape[1]:])
                                                 .mean())} for c in cases]
    report["first_failure"] = _first_failure(report)
    report["passed"] = report["first_failure"] is None
    return report


def _reference_ids(model, ids: np.ndarray, mask: np.ndarray, settings: dict[str, Any], manifest: Manifest,
                   device: str, block: bool) -> np.ndarray:
    """The torch reference sampler's canvas for one grid case (the block sampler for a block-diffusion export)."""
    t_ids, t_mask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
    if not block:
        return generate(model, t_ids, t_mask, seed=SEED, **settings).cpu().numpy()
    return block_generate(model, t_ids, t_mask, settings=BlockSettings.of(settings),
                          mask_id=manifest.id("mask_token_id"), eos_id=manifest.id("eos_token_id"),
                          pad_id=manifest.id("pad_token_id"), noise=Noise.of(None, SEED)).cpu().numpy()


def with_padded_row(ids: np.ndarray, mask: np.ndarray, *, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch, with one more row when none is left-padded: the first prompt without its first token, padded
    (padding is what most often goes wrong in a deployment)."""
    if not mask.all() or ids.shape[1] < 2:
        return ids, mask
    row, row_mask = np.r_[pad_id, ids[0, 1:]], np.r_[0, mask[0, 1:]]
    return np.vstack([ids, row]), np.vstack([mask, row_mask])


def _masked_inputs(ids: np.ndarray, mask: np.ndarray, mask_id: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The prompts with a fixed random share of their tokens masked, at each of :data:`MASK_RATIOS`."""
    rng = np.random.default_rng(0)
    out = []
    for ratio in MASK_RATIOS:
        chosen = (rng.random(ids.shape) < ratio) & (mask == 1)
        out.append((np.where(chosen, mask_id, ids), chosen))
    return out


def _compare_logits(reference: np.ndarray, logits: np.ndarray, mask: np.ndarray, exact: bool) -> dict[str, Any]:
    valid = mask.astype(bool)
    ref, got = reference[valid], logits[valid]
    diff = np.abs(got - ref)
    scale = max(1.0, float(ref.std()))
    tolerance = FP32_RELATIVE_TOLERANCE * scale
    top2 = np.sort(np.partition(ref, -2, axis=-1)[:, -2:], axis=-1)
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * (tolerance if exact else float(diff.max()))
    same = got.argmax(-1) == ref.argmax(-1)
    return {"positions": int(valid.sum()), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "logit_scale": scale, "tolerance": tolerance if exact else None,
            "top1_agreement": float(same.mean()), "decisive_positions": int(decisive.sum()),
            "decisive_top1_agreement": float(same[decisive].mean()) if decisive.any() else None,
            "finite": bool(np.isfinite(got).all())}


def _compare_loss(reference: list[np.ndarray], runtime: list[np.ndarray], ids: np.ndarray,
                  masks: list[np.ndarray], manifest: Manifest) -> dict[str, Any]:
    def loss(logits: list[np.ndarray]) -> float:
        total = count = 0.0
        for lg, chosen in zip(logits, masks):
            rows = lg[chosen].astype(np.float64)
            top = rows.max(-1, keepdims=True)
            log_z = top[:, 0] + np.log(np.exp(rows - top).sum(-1))
            total += float((log_z - rows[np.arange(len(rows)), ids[chosen]]).sum())
            count += len(rows)
        return total / max(count, 1)

    kind = manifest.variant.split("-")[0] if manifest.variant != "exact" else "fp16"  # or a bf16 reference
    torch_loss, runtime_loss = loss(reference), loss(runtime)
    return {"torch": torch_loss, "runtime": runtime_loss, "relative_change": (runtime_loss - torch_loss) / torch_loss,
            "tolerance": LOSS_TOLERANCE[kind], "mask_ratios": list(MASK_RATIOS)}


def _first_failure(report: dict[str, Any]) -> str | None:
    lg = report["logits"]
    if not lg["finite"]:
        return "logits: the export produced NaN or inf"
    if report["exact"]:
        if lg["max_abs_diff"] > lg["tolerance"]:
            return f"logits: max |diff| {lg['max_abs_diff']:.3g} exceeds {lg['tolerance']:.3g}"
        if lg["decisive_top1_agreement"] not in (None, 1.0):
            return f"logits: top-1 differs at decisive positions ({lg['decisive_top1_agreement']:.2%} agree)"
        for case in report["cases"]:
            if not case["token_exact"]:
                return f"sampler: {', '.join(f'{k} {v}' for k, v in case['settings'].items())} is not token-exact"
        return None
    if lg["decisive_top1_agreement"] is not None and lg["decisive_top1_agreement"] < FP16_MIN_AGREEMENT:
        return f"logits: decisive top-1 agreement {lg['decisive_top1_agreement']:.2%} is below {FP16_MIN_AGREEMENT:.0%}"
    loss = report["loss"]
    if loss["relative_change"] > loss["tolerance"]:
        return (f"masked-token loss: {loss['runtime']:.4f} against torch's {loss['torch']:.4f} "
                f"({loss['relative_change']:+.2%}, tolerance {loss['tolerance']:.0%})")
    return None


def table(report: dict[str, Any]) -> str:
    """The report as the CLI prints it."""
    lg = report["logits"]
    judged = "exact" if report["exact"] else "approximate (judged by agreement and loss)"
    lines = [f"export {report['export']} ({report['dtype']}, {report['variant']}, {report['provider']}): {judged}",
             f"logits over {lg['positions']} positions: max |diff| {lg['max_abs_diff']:.3g}"
             + (f" (tolerance {lg['tolerance']:.3g})" if lg["tolerance"] is not None else "")
             + f", mean {lg['mean_abs_diff']:.3g}, top-1 agreement {lg['top1_agreement']:.2%}"
             + (f", {lg['decisive_top1_agreement']:.2%} on {lg['decisive_positions']} decisive positions"
                if lg["decisive_top1_agreement"] is not None else ", no decisive position")]
    if "loss" in report:
        loss = report["loss"]
        lines.append(f"masked-token loss: torch {loss['torch']:.4f}, export {loss['runtime']:.4f} "
                     f"({loss['relative_change']:+.2%}; tolerance {loss['tolerance']:.0%})")
    names = [", ".join(f"{k} {v}" for k, v in case["settings"].items()) for case in report["cases"]]
    width = max(len("sampler settings"), *map(len, names))
    lines += ["", f"{'sampler settings':{width}s}  {'tokens':>10s}"]
    for name, case in zip(names, report["cases"]):
        verdict = "exact" if case["token_exact"] else f"{case['token_agreement']:.1%} same"
        lines.append(f"{name:{width}s}  {verdict:>10s}")
    lines.append("")
    lines.append("PASSED" if report["passed"] else f"FAILED: {report['first_failure']}")
    return "\n".join(lines)

