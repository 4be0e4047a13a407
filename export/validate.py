"""Validation of a fresh export: run it in onnxruntime and compare with the torch model it came from.

Inputs cover what the sampler sends: a batch with a left-padded row, all positions and a tail subset. fp32 must
match torch to 1e-4 of the logit scale with identical ``top_ids`` wherever torch's choice is not a near-tie.
fp16 is compared with torch fp32: it must be finite, its logit error within 5% of the logit scale, and its
``top_ids`` must agree on at least 99% of the decisive positions (torch's top-2 margin above twice the measured
error; a closer pair may legitimately flip in half precision). Raw agreement is reported as well. With experts
(LLaDA-MoE) half precision also flips the router's top-k where two experts nearly tie, and a token that takes
another expert moves by more than rounding: measured at the real 7.35B shape, max |diff| 8% of the logit scale
with a mean of 0.3% and every decisive top-1 equal. There the mean error is held to 1% of the scale instead of
the max to 5% (the max is still recorded).
A quantized graph changes the function on purpose: its agreement and errors are recorded (the export's
``validation.json``; the README compares the variants) and only non-finite output fails it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.modeling import LLaDAModel
from ..runtime.contract import BLOCK_FORWARD
from ..runtime.errors import LladaOnnxError
from ..runtime.manifest import Manifest

FP32_RELATIVE_TOLERANCE = 1e-4
FP16_MIN_AGREEMENT = 0.99
FP16_MAX_RELATIVE_ERROR = 0.05
BLOCK_LENGTH = 8  # the block length a block-diffusion graph is validated at
FP16_EXPERTS_MEAN_RELATIVE_ERROR = 0.01  # with experts, whose routing may flip at near-ties (see above)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ValidationError(LladaOnnxError, RuntimeError):
    """The exported graph disagrees with torch beyond tolerance (figures in the message)."""


def validation_inputs(manifest: Manifest, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Feeds for the export's main graph: a batch with a left-padded row, predicting every position and a tail;
    a block-diffusion graph gets :data:`BLOCK_LENGTH`, a boundary inside the padded row's prompt and the tail."""
    vocab_size, max_length = manifest.vocab_size, manifest.max_sequence_length
    rng = np.random.default_rng(seed)
    length = min(48, max_length)
    ids = rng.integers(0, vocab_size, size=(2, length), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    every = np.broadcast_to(np.arange(length, dtype=np.int64), (2, length)).copy()
    tail = every[:, -max(1, length // 3):].copy()
    block = {"block_length": np.array(BLOCK_LENGTH, dtype=np.int64)} if manifest.main_kind == BLOCK_FORWARD.name else {}
    return [{"input_ids": ids, "attention_mask": mask, "positions": p, **block} for p in (every, tail)]


def validate_export(export_dir, model: LLaDAModel, *, dtype: str, device: str = "cpu",
                    quantized: bool = False) -> dict:
    """Compare the export in ``export_dir`` with ``model``; return the figures or raise ValidationError."""
    import onnxruntime as ort

    manifest = Manifest.load(export_dir)
    provider = PROVIDERS[device]
    if provider not in ort.get_available_providers():
        raise ValidationError(f"validation needs onnxruntime's {provider}, which this install lacks "
                              f"(has {ort.get_available_providers()}); install onnxruntime-gpu or use --no-validate")
    session = ort.InferenceSession(str(manifest.graph_path), providers=[provider])
    reference = model.float() if dtype != "fp32" else model
    block = manifest.main_kind == BLOCK_FORWARD.name
    max_diff = prob_diff = 0.0
    abs_diffs = []
    margins, matches = [], []
    scale = 1.0
    finite = True
    for feeds in validation_inputs(manifest):
        logits, top_ids, top_prob = session.run(None, feeds)
        with torch.no_grad():
            t = {k: torch.from_numpy(v).to(next(reference.parameters()).device) for k, v in feeds.items()}
            options = {"block_length": t["block_length"]} if block else {"always_mask": True}
            ref = reference(t["input_ids"], t["attention_mask"], t["positions"], **options).float().cpu()
        ref_np = ref.numpy()
        finite &= bool(np.isfinite(logits).all() and np.isfinite(top_prob).all())
        scale = max(scale, float(ref_np.std()))
        diff = np.abs(logits.astype(np.float32) - ref_np)
        max_diff = max(max_diff, float(diff.max()))
        abs_diffs.append(float(diff.mean()))
        ref_top = ref_np.argmax(-1)
        prob_diff = max(prob_diff, float(np.abs(top_prob - torch.softmax(ref, -1).amax(-1).numpy()).max()))
        top2 = np.sort(np.partition(ref_np, -2, axis=-1)[..., -2:], axis=-1)
        margin = top2[..., 1] - top2[..., 0]
        margins.append(margin.ravel())
        matches.append((top_ids == ref_top).ravel())
    margin, same = np.concatenate(margins), np.concatenate(matches)
    fp32 = dtype == "fp32"
    decisive = margin > 2 * (FP32_RELATIVE_TOLERANCE * scale if fp32 and not quantized else max_diff)
    decisive_agreement = float(same[decisive].mean()) if decisive.any() else 1.0
    report = {
        "provider": provider, "dtype": dtype, "variant": manifest.variant, "reference": "torch fp32",
        "logits_max_abs_diff": max_diff, "logits_mean_abs_diff": float(np.mean(abs_diffs)), "logit_scale": scale,
        "logits_tolerance": FP32_RELATIVE_TOLERANCE * scale if fp32 and not quantized else None,
        "top_ids_agreement": float(same.mean()), "top_ids_decisive_positions": int(decisive.sum()),
        "top_ids_decisive_agreement": decisive_agreement,
        "top_ids_decisive_disagreements": int((~same & decisive).sum()),
        "top_prob_max_abs_diff": prob_diff, "finite": finite, "positions_compared": int(same.size),
    }
    problems = []
    if not finite:
        problems.append("the graph produced NaN or inf")
    if not fp32 and not quantized and decisive_agreement < FP16_MIN_AGREEMENT:
        problems.append(f"top_ids agreement on decisive positions {decisive_agreement:.2%} is below "
                        f"{FP16_MIN_AGREEMENT:.0%}")
    if quantized:  # recorded, not judged (see the module docstring)
        pass
    elif fp32:
        if max_diff > report["logits_tolerance"]:
            problems.append(f"max |logits diff| {max_diff:.3g} exceeds {report['logits_tolerance']:.3g}")
        if report["top_ids_decisive_disagreements"]:
            problems.append(f"top_ids differ from torch at {report['top_ids_decisive_disagreements']} "
                            "position(s) that are no near-tie")
    elif manifest.raw.get("moe"):
        if report["logits_mean_abs_diff"] > FP16_EXPERTS_MEAN_RELATIVE_ERROR * scale:
            problems.append(f"mean |logits diff| {report['logits_mean_abs_diff']:.3g} exceeds "
                            f"{FP16_EXPERTS_MEAN_RELATIVE_ERROR:.0%} of the logit scale {scale:.3g}")
    else:
        if max_diff > FP16_MAX_RELATIVE_ERROR * scale:
            problems.append(f"max |logits diff| {max_diff:.3g} exceeds {FP16_MAX_RELATIVE_ERROR:.0%} of the "
                            f"logit scale {scale:.3g}")
    if problems:
        raise ValidationError("export validation failed: " + "; ".join(problems) + f" (figures: {report})")
    return report


def validate_cache_graph(export_dir, model: LLaDAModel, *, dtype: str, device: str = "cpu",
                         quantized: bool = False) -> dict:
    """Check ``cache.onnx`` through the runtime's own cache session: a refresh (whole canvas) and a cached step on
    the block it left must both give torch's logits for the block (fp32: within 1e-4 of the logit scale; fp16:
    within 5%; quantized: recorded, and finite)."""
    from ..runtime.kv_cache import KVCacheSession

    cache = KVCacheSession(Manifest.load(export_dir), device)
    every, tail = validation_inputs(cache.manifest)
    ids, mask, block = every["input_ids"], every["attention_mask"], tail["positions"]
    refresh, kv = cache.refresh(ids, mask, block, logits=True)
    step = cache.step(ids, mask, int(block[0, 0]), ids.shape[1], block, kv, logits=True)  # the tail, contiguous
    reference = model.float() if dtype != "fp32" else model
    with torch.no_grad():
        t = [torch.from_numpy(a).to(next(reference.parameters()).device) for a in (ids, mask, block)]
        ref = reference(*t, always_mask=True).float().cpu().numpy()
    scale = max(1.0, float(ref.std()))
    by_mean = dtype != "fp32" and bool(cache.manifest.raw.get("moe"))  # as validate_export judges experts in fp16
    tolerance = (FP32_RELATIVE_TOLERANCE if dtype == "fp32" else
                 FP16_EXPERTS_MEAN_RELATIVE_ERROR if by_mean else FP16_MAX_RELATIVE_ERROR) * scale
    errors = {name: np.abs(out.logits - ref) for name, out in (("refresh", refresh), ("step", step))}
    report = {**{f"{name}_max_abs_diff": float(e.max()) for name, e in errors.items()},
              **{f"{name}_mean_abs_diff": float(e.mean()) for name, e in errors.items()},
              "judged_on": "mean" if by_mean else "max", "tolerance": None if quantized else tolerance}
    worst = max(report[f"{name}_{'mean' if by_mean else 'max'}_abs_diff"] for name in errors)
    if not np.isfinite(worst) or (worst > tolerance and not quantized):
        raise ValidationError(f"KV-cache graph validation failed: {report}")
    return report


def validate_against_float(quantized_dir, float_dir, *, device: str = "cpu") -> dict:
    """Record a quantized export's agreement with the float export it was made from (no torch needed): the
    validation inputs through both graphs; only non-finite output fails."""
    import onnxruntime as ort

    quantized, reference = Manifest.load(quantized_dir), Manifest.load(float_dir)
    provider = PROVIDERS[device]
    sessions = [ort.InferenceSession(str(m.graph_path), providers=[provider]) for m in (quantized, reference)]
    same, diffs, prob_diff, scale, finite = [], [], 0.0, 1.0, True
    for feeds in validation_inputs(reference):
        (logits, top_ids, top_prob), (ref_logits, ref_ids, ref_prob) = (s.run(None, feeds) for s in sessions)
        finite &= bool(np.isfinite(logits).all() and np.isfinite(top_prob).all())
        diffs.append(np.abs(logits.astype(np.float32) - ref_logits.astype(np.float32)))
        scale = max(scale, float(ref_logits.astype(np.float32).std()))
        prob_diff = max(prob_diff, float(np.abs(top_prob - ref_prob).max()))
        same.append((top_ids == ref_ids).ravel())
    report = {"provider": provider, "dtype": quantized.dtype, "variant": quantized.variant,
              "reference": f"float export ({reference.dtype})", "logit_scale": scale,
              "logits_max_abs_diff": float(max(d.max() for d in diffs)),
              "logits_mean_abs_diff": float(np.mean([d.mean() for d in diffs])),
              "top_ids_agreement": float(np.concatenate(same).mean()), "top_prob_max_abs_diff": prob_diff,
              "finite": finite, "positions_compared": int(np.concatenate(same).size)}
    if not finite:
        raise ValidationError(f"the quantized graph produced NaN or inf (figures: {report})")
    return report
