"""Validation of a fresh export: run it in onnxruntime and compare with the torch model it came from.

Inputs cover what the sampler sends: a batch with a left-padded row, all positions and a tail subset. fp32 must
match torch to 1e-4 of the logit scale with identical ``top_ids`` wherever torch's choice is not a near-tie.
fp16 is compared with torch fp32: it must be finite, its logit error within 5% of the logit scale, and its
``top_ids`` must agree on at least 99% of the decisive positions (torch's top-2 margin above twice the measured
error; a closer pair may legitimately flip in half precision). Raw agreement is reported as well. With experts
(LLaDA-MoE) half precision also flips the router's top-k where two experts nearly tie, and a token that takes
another expert moves by more than rounding: measured at the real 7.35B shape, max |diff| 8% of the logit scale
with a mean of 0.3% and every decisive top-1 equal. There the mean error is held to 1% of the scale instead of
the max to 5% (the max is still recorded), or to twice the error of the torch model itself run in half precision,
where that is larger: LLaDA2's real width with random weights loses 0.9% of the scale in torch fp16 at 2 layers
and 2.2% at 4 (its routing scores, biases and 2.5x scaling flip more experts), and no graph can be closer to
fp32 than its own precision allows.
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
from ..runtime.providers import ProviderUnavailableError, resolve, session_options

FP32_RELATIVE_TOLERANCE = 1e-4
FP16_MIN_AGREEMENT = 0.99
FP16_MAX_RELATIVE_ERROR = 0.05
BLOCK_LENGTH = 8  # the block length a block-diffusion graph is validated at
FP16_EXPERTS_MEAN_RELATIVE_ERROR = 0.01  # with experts, whose routing may flip at near-ties (see above)
HALF_ERROR_FACTOR = 2.0  # ... or twice the error torch itself makes in half precision, where that is larger


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
    block = {}
    if manifest.main_kind == BLOCK_FORWARD.name:  # the full forward: an empty past
        sizes = manifest.sizes
        empty = np.zeros((2, sizes.n_kv_heads, 0, sizes.head_dim), dtype=np.float16 if manifest.dtype == "fp16"
                         else np.float32)
        block = {"block_length": np.array(BLOCK_LENGTH, dtype=np.int64), "cached_mask": np.zeros((2, 0), np.int64),
                 **{name: empty for name in BLOCK_FORWARD.layer_input_names(sizes.n_layers)}}
    return [{"input_ids": ids, "attention_mask": mask, "positions": p, **block} for p in (every, tail)]


def validate_export(export_dir, model: LLaDAModel, *, dtype: str, device: str = "cpu",
                    quantized: bool = False) -> dict:
    """Compare the export in ``export_dir`` with ``model``; return the figures or raise ValidationError."""
    import onnxruntime as ort

    manifest = Manifest.load(export_dir)
    providers = _providers(device)
    provider = providers[0][0]
    session = ort.InferenceSession(str(manifest.graph_path), session_options(provider), providers=providers)
    block = manifest.main_kind == BLOCK_FORWARD.name
    inputs = validation_inputs(manifest)
    by_mean = dtype != "fp32" and bool(manifest.raw.get("moe")) and not quantized
    half = [_torch_logits(model, feeds, block) for feeds in inputs] if by_mean else None  # torch in half precision
    reference = model.float() if dtype != "fp32" else model
    max_diff = prob_diff = 0.0
    abs_diffs, half_diffs = [], []
    margins, matches = [], []
    scale = 1.0
    finite = True
    for i, feeds in enumerate(inputs):
        logits, top_ids, top_prob = session.run(["logits", "top_ids", "top_prob"], feeds)
        ref_np = _torch_logits(reference, feeds, block)
        ref = torch.from_numpy(ref_np)
        if half is not None:
            half_diffs.append(float(np.abs(half[i] - ref_np).mean()))
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
    if by_mean:
        report["torch_half_mean_abs_diff"] = float(np.mean(half_diffs))
        report["mean_tolerance"] = max(FP16_EXPERTS_MEAN_RELATIVE_ERROR * scale,
                                       HALF_ERROR_FACTOR * report["torch_half_mean_abs_diff"])
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
    elif by_mean:
        if report["logits_mean_abs_diff"] > report["mean_tolerance"]:
            problems.append(f"mean |logits diff| {report['logits_mean_abs_diff']:.3g} exceeds "
                            f"{report['mean_tolerance']:.3g} (the larger of {FP16_EXPERTS_MEAN_RELATIVE_ERROR:.0%} "
                            f"of the logit scale {scale:.3g} and {HALF_ERROR_FACTOR:g}x torch's own error in "
                            f"half precision, {report['torch_half_mean_abs_diff']:.3g})")
    else:
        if max_diff > FP16_MAX_RELATIVE_ERROR * scale:
            problems.append(f"max |logits diff| {max_diff:.3g} exceeds {FP16_MAX_RELATIVE_ERROR:.0%} of the "
                            f"logit scale {scale:.3g}")
    if problems:
        raise ValidationError("export validation failed: " + "; ".join(problems) + f" (figures: {report})")
    return report


def _providers(device: str) -> list:
    """onnxruntime's providers for ``device`` ("cpu", "cuda"), with the options the runtime gives them; a provider
    this install lacks fails validation, naming the way out."""
    try:
        return resolve(device)
    except ProviderUnavailableError as e:
        raise ValidationError(f"validation cannot run: {e}; install it or use --no-validate") from None


def _torch_logits(model, feeds: dict[str, np.ndarray], block: bool) -> np.ndarray:
    """The torch model's logits (float32, on the host) for one set of validation feeds."""
    device = next(model.parameters()).device
    t = {k: torch.from_numpy(feeds[k]).to(device) for k in ("input_ids", "attention_mask", "positions")}
    options = {"block_length": int(feeds["block_length"])} if block else {"always_mask": True}
    with torch.no_grad():
        return model(t["input_ids"], t["attention_mask"], t["positions"], **options).float().cpu().numpy()


def validate_cache_graph(export_dir, model: LLaDAModel, *, dtype: str, device: str = "cpu",
                         quantized: bool = False, mean_tolerance: float | None = None) -> dict:
    """Check ``cache.onnx`` through the runtime's own cache session: a refresh (whole canvas) and a cached step on
    the block it left must both give torch's logits for the block (judged by :func:`_judge`)."""
    from ..runtime.kv_cache import KVCacheSession

    cache = KVCacheSession(Manifest.load(export_dir), device)
    every, tail = validation_inputs(cache.manifest)
    ids, mask, block = every["input_ids"], every["attention_mask"], tail["positions"]
    refresh, kv = cache.refresh(ids, mask, block, logits=True)
    step = cache.step(ids, mask, int(block[0, 0]), ids.shape[1], block, kv, logits=True)  # the tail, contiguous
    reference = model.float() if dtype != "fp32" else model
    ref = _torch_logits(reference, tail, block=False)
    errors = {name: np.abs(out.logits - ref) for name, out in (("refresh", refresh), ("step", step))}
    return _judge(errors, max(1.0, float(ref.std())), cache.manifest, quantized, "KV-cache graph", mean_tolerance)


def _judge(errors: dict[str, np.ndarray], scale: float, manifest: Manifest, quantized: bool, what: str,
           mean_tolerance: float | None) -> dict:
    """The report of cached calls' logit errors against torch, judged on the max error (fp32: 1e-4 of the logit
    scale; fp16: 5%), or with experts in fp16 on the mean, against the ``mean_tolerance`` :func:`validate_export`
    found (default 1% of the scale); quantized: recorded, and finite."""
    by_mean = manifest.dtype != "fp32" and bool(manifest.raw.get("moe"))
    tolerance = (FP32_RELATIVE_TOLERANCE if manifest.dtype == "fp32" else
                 FP16_EXPERTS_MEAN_RELATIVE_ERROR if by_mean else FP16_MAX_RELATIVE_ERROR) * scale
    if by_mean and mean_tolerance is not None:
        tolerance = mean_tolerance
    report = {**{f"{name}_max_abs_diff": float(e.max()) for name, e in errors.items()},
              **{f"{name}_mean_abs_diff": float(e.mean()) for name, e in errors.items()},
              "judged_on": "mean" if by_mean else "max", "tolerance": None if quantized else tolerance}
    worst = max(report[f"{name}_{'mean' if by_mean else 'max'}_abs_diff"] for name in errors)
    if not np.isfinite(worst) or (worst > tolerance and not quantized):
        raise ValidationError(f"{what} validation failed: {report}")
    return report


def validate_block_cache(export_dir, model, *, dtype: str, device: str = "cpu", quantized: bool = False,
                         mean_tolerance: float | None = None) -> dict:
    """Check a ``block_forward`` graph's cache through the runtime's own :class:`BlockCache`: on the validation
    batch (a padded row, so the rows' block grids differ), the first call (the prompt's two whole blocks and the
    next one fed) and the cached call after it (that block appended, the following one fed) must both give torch's
    full-forward logits for the block they predict (judged by :func:`_judge`)."""
    from ..runtime.block_cache import BlockCache
    from ..runtime.session import GraphSession

    graph = GraphSession(Manifest.load(export_dir), device)
    every = validation_inputs(graph.manifest)[0]
    ids, mask, b = every["input_ids"], every["attention_mask"], BLOCK_LENGTH
    pads = (mask == 0).sum(axis=1)
    cache = BlockCache(graph, mask, [int(p) + 2 * b for p in pads], b, graph.manifest.id("pad_token_id"))
    ref = _torch_logits(model.float() if dtype != "fp32" else model, every, block=True)  # every position
    errors = {}
    for name, block in (("first", 0), ("cached", 1)):
        out = cache.step(ids, [0, 1], block, logits=True)
        spans = [np.arange(p + (2 + block) * b, p + (3 + block) * b) for p in pads]
        errors[name] = np.abs(out.logits - np.stack([ref[r, span] for r, span in enumerate(spans)]))
    return _judge(errors, max(1.0, float(ref.std())), graph.manifest, quantized, "block cache", mean_tolerance)


def validate_against_float(quantized_dir, float_dir, *, device: str = "cpu") -> dict:
    """Record a quantized export's agreement with the float export it was made from (no torch needed): the
    validation inputs through both graphs; only non-finite output fails."""
    import onnxruntime as ort

    quantized, reference = Manifest.load(quantized_dir), Manifest.load(float_dir)
    providers = _providers(device)
    provider = providers[0][0]
    # onnxruntime maps an external weight file into memory and reads it in place, unless a kernel pre-packs the
    # weight, which copies it: the float graph, the largest thing here (65 GB for LLaDA2-mini in fp32), is run
    # unpacked, so validating costs the quantized graph's memory and not the float graph's as well.
    unpacked = session_options(provider)
    unpacked.add_session_config_entry("session.disable_prepacking", "1")
    sessions = [ort.InferenceSession(str(quantized.graph_path), session_options(provider), providers=providers),
                ort.InferenceSession(str(reference.graph_path), unpacked, providers=providers)]
    same, diffs, prob_diff, scale, finite = [], [], 0.0, 1.0, True
    for feeds in validation_inputs(reference):
        (logits, top_ids, top_prob), (ref_logits, ref_ids, ref_prob) = (
            s.run(["logits", "top_ids", "top_prob"], feeds) for s in sessions)
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
