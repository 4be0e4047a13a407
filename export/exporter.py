"""Checkpoint directory -> self-contained ONNX directory that the torch-free runtime loads on its own.

Steps: check (config, weights, disk space, opset) -> load the checkpoint lazily -> trace with the dynamo exporter
-> save graph + one external-data file -> optionally fuse (:mod:`.fusion`) and quantize (:mod:`.quantize`) it ->
write ``llada_onnx.json`` and copy the tokenizer files -> validate in onnxruntime against torch. Everything is
written into a temporary directory beside the output and renamed into place only once validation passed, so a
failure or Ctrl-C never leaves a half-written export behind.

A quantized export first writes the float graph it quantizes (for LLaDA2-mini in fp32: 65 GB for a 10 GB result).
``scratch`` puts that graph on another disk or in memory (``/dev/shm``), in a temporary folder removed however
the export ends, so the output's disk only needs room for the quantized graph.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import io
import json
import logging
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.checkpoint import INDEX_FILE, check_weight_files, checkpoint_bytes, load_model
from ..models.registry import Architecture, read_checkpoint_config
from ..runtime.contract import BLOCK_FORWARD, GRAPH_KINDS, KV_CACHE, MANIFEST_FILE, GraphKind, ModelSizes
from ..runtime.manifest import FUSIONS, manifest_dict
from .fusion import CACHE_REQUIRED, fuse_for_onnxruntime
from .graph import BlockSamplerGraph, CachedSamplerGraph, SamplerGraph
from .moe import MOE_FORMS, translation_table
from .quantize import Quantization, QuantizationError, quantize_graph, remove_graph
from .quantize_experts import experts_layout
from .shared_weights import share_weights
from .staging import ExportError, disk_full_is_reported, prepare_output, staged_directory
from .validate import ValidationError, validate_block_cache, validate_cache_graph, validate_export

TRACED_FILE = "traced.onnx"  # a graph before quantization, deleted once the quantizer has written its own
DEFAULT_OPSET = 20  # the highest opset the DirectML execution provider supports
MIN_OPSET, MAX_OPSET = 18, 23  # the dynamo exporter's floor; the newest opset onnxruntime runs
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
COPIED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "generation_config.json")


@dataclass
class ExportResult:
    output_dir: Path
    files: dict[str, int]
    validation: dict | None
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0


class _Progress:
    """Stage-by-stage progress on stderr: the slow stages are opaque calls, so each gets a start and a time."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.n = enabled, total, 0
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        self.n += 1
        if self.enabled:
            print(f"[{self.n}/{self.total}] {name} ...", end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if self.enabled:
                print(" failed", file=sys.stderr, flush=True)
            raise
        self.seconds[name] = time.perf_counter() - start
        if self.enabled:
            print(f" done ({self.seconds[name]:.1f} s)", file=sys.stderr, flush=True)


def export(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    *,
    dtype: str = "fp32",
    opset: int | None = None,
    device: str = "cpu",
    force: bool = False,
    validate: bool = True,
    progress: bool = True,
    fusion: str = "none",
    cache: bool = False,
    quantization: Quantization = Quantization(),
    moe: str = "fused",
    scratch: str | Path | None = None,
) -> ExportResult:
    """Export a LLaDA checkpoint (Hugging Face layout) to ``output_dir``; see the module docstring.

    ``fusion="ort"`` rewrites attention and RMSNorm into onnxruntime contrib ops (see :mod:`.fusion`): faster on
    the CPU and CUDA providers; ``"none"`` keeps standard ONNX ops only, which every provider (DirectML too) runs.
    ``cache=True`` adds ``cache.onnx``, the block-wise KV-cache graph of fast decoding (same weights, no copy).
    ``quantization`` (see :mod:`.quantize`) turns the weights into int8 or int4 after tracing (and fusing); the
    KV-cache graph gets the same quantization and still shares the main graph's (quantized) weights.
    ``moe`` writes a mixture-of-experts architecture's experts as onnxruntime's fused MoE kernel or in standard
    ops (see :mod:`.moe`). ``scratch``: where a quantized export writes its float graph (see the module docstring).
    """
    ckpt = Path(checkpoint_dir)
    opset = DEFAULT_OPSET if opset is None else opset
    say = _say if progress else _quiet
    if moe not in MOE_FORMS:
        raise ExportError(f"unknown MoE form {moe!r}; use one of {', '.join(MOE_FORMS)}")
    architecture, cfg = _check_request(ckpt, dtype=dtype, opset=opset, device=device, validate=validate,
                                       fusion=fusion, cache=cache, quantization=quantization)
    if architecture.experts and moe == "decomposed" and quantization.method != "none":
        raise ExportError("--quantize needs --moe fused: quantized experts are onnxruntime's QMoE op, and the "
                          "decomposed experts would stay in float")
    if architecture.experts:
        quantization.check_experts(dtype)
    translations = translation_table(moe) if architecture.experts else {}
    quantize = quantization.method != "none"
    if scratch is not None and not quantize:
        raise ExportError("--scratch holds the float graph of a quantized export; without --quantize it is unused")
    if scratch is not None and not Path(scratch).is_dir():
        raise ExportError(f"scratch folder {scratch} does not exist; create it or name another folder")
    sizes = architecture.sizes(cfg)
    out = prepare_output(output_dir, inputs=[ckpt], force=force, say=say)
    need, float_graph = _disk_needed(architecture.parameter_count(cfg), dtype, cache, quantization)
    if scratch is None:
        _check_disk(out.parent, need + float_graph)
    else:
        _check_disk(out.parent, need)
        _check_disk(Path(scratch), float_graph)
    # Quantized experts are laid out for one provider's kernel (Quantization.check_experts): validated there
    # whatever device torch runs on.
    layout = experts_layout(dtype) if architecture.experts and quantize else None
    provider_device = layout or device
    main = GRAPH_KINDS[architecture.graph_kinds[0]]
    stages = _Progress(progress, total=4 + validate + (1 + cache) * ((fusion != "none") + quantize)
                       + cache * (2 + validate) + validate * (main is BLOCK_FORWARD))
    with disk_full_is_reported(out, need + float_graph), staged_directory(out) as tmp:
        with stages.stage("loading checkpoint"):
            model = load_model(ckpt, dtype=DTYPES[dtype], device=device).fuse_projections()
        fusions, quantized = _write_graph(lambda: _trace(main, model, sizes, opset, device, translations),
                                          tmp / main.file, "the graph", fusion=fusion, device=device,
                                          required=CACHE_REQUIRED if main.per_layer_inputs else None,
                                          quantization=quantization, embedding_size=sizes.vocab_size, stages=stages,
                                          scratch=scratch)
        if cache:
            _write_graph(lambda: _trace_cache(CachedSamplerGraph(model, device).eval(), sizes, opset, device,
                                              translations),
                         tmp / KV_CACHE.file, "the KV-cache graph", fusion=fusion, required=CACHE_REQUIRED,
                         device=device,
                         quantization=quantization, embedding_size=sizes.vocab_size, stages=stages,
                         scratch=scratch)
            share_weights(tmp / main.file, tmp / KV_CACHE.file)
        with stages.stage("writing manifest and tokenizer files"):
            graphs = {kind.name: kind.file for kind in (main, KV_CACHE) if kind is main or cache}
            _write_metadata(tmp, ckpt, architecture, cfg, graphs=graphs, dtype=dtype, opset=opset, fusion=fusion,
                            fusions=fusions, quantization=quantization, quantized_ops=quantized,
                            moe=moe if architecture.experts else None, experts_layout=layout)
        report = None
        if validate:
            with stages.stage("validating in onnxruntime against torch"):
                report = validate_export(tmp, model, dtype=dtype, device=provider_device, quantized=quantize)
            if main is BLOCK_FORWARD:
                with stages.stage("validating the block cache"):
                    report["block_cache"] = validate_block_cache(tmp, model, dtype=dtype, device=provider_device,
                                                                 quantized=quantize,
                                                                 mean_tolerance=report.get("mean_tolerance"))
            if cache:
                with stages.stage("validating the KV-cache graph"):
                    report["cache_graph"] = validate_cache_graph(tmp, model, dtype=dtype, device=provider_device,
                                                                 quantized=quantize,
                                                                 mean_tolerance=report.get("mean_tolerance"))
            (tmp / "validation.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        del model
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    result = ExportResult(out, files, report, stages.seconds, _peak_rss_mb())
    if progress:
        print(summary(result), file=sys.stderr)
    return result


def summary(result: ExportResult) -> str:
    lines = [f"exported to {result.output_dir}"]
    lines += [f"  {name:28s} {size / 1e6:10.1f} MB" for name, size in result.files.items()]
    if result.validation:
        v = result.validation
        tolerance = v.get("logits_tolerance")  # fp32 only: fp16 is judged by agreement (see validate.py)
        bound = f" (tolerance {tolerance:.3g})" if tolerance is not None else f" (logit scale {v['logit_scale']:.3g})"
        decisive = v["top_ids_decisive_positions"]
        on_decisive = (f"{v['top_ids_decisive_agreement']:.4%} of the {decisive} positions that are no near-tie"
                       if decisive else "no position was decisive: every top-2 margin is within the measured error")
        lines.append(f"  validation ({v['provider']}, {v['dtype']} vs torch fp32): max |logits diff| "
                     f"{v['logits_max_abs_diff']:.3g}{bound}, top_ids agreement {v['top_ids_agreement']:.4%} "
                     f"({on_decisive}), max |top_prob diff| {v['top_prob_max_abs_diff']:.3g}")
    lines.append(f"  time {sum(result.seconds.values()):.1f} s, peak RSS {result.peak_rss_mb:.0f} MB")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- steps
def _check_request(ckpt: Path, *, dtype: str, opset: int, device: str, validate: bool, fusion: str, cache: bool,
                   quantization: Quantization) -> tuple[Architecture, object]:
    if fusion not in FUSIONS:
        raise ExportError(f"unknown fusion {fusion!r}; use one of {', '.join(FUSIONS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    try:
        quantization.check(dtype)
    except QuantizationError as e:
        raise ExportError(str(e)) from None
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is out of range: use {MIN_OPSET}..{MAX_OPSET} "
                          f"(default {DEFAULT_OPSET}, the highest DirectML runs)")
    if device not in ("cpu", "cuda"):
        raise ExportError(f"unknown device {device!r}; use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda was asked for but torch sees no CUDA device")
    if dtype == "fp16" and device == "cpu" and validate:
        raise ExportError(
            "an fp16 export is validated on the CUDA execution provider, and --device cpu cannot run it there "
            "(onnxruntime's CPU provider lacks fp16 kernels for parts of the graph): use --device cuda, or "
            "--no-validate to export without validation")
    architecture, cfg = read_checkpoint_config(ckpt)  # raises for a missing/foreign/unsupported/damaged config
    if cache and KV_CACHE.name not in architecture.graph_kinds:
        why = ("its graph caches finished blocks exactly, always" if architecture.sampler == "block_diffusion"
               else "it has no KV-cache graph yet")
        raise ExportError(f"--cache does not apply to {architecture.name}: {why}; export without --cache")
    check_weight_files(ckpt)  # raises for missing or damaged weights
    return architecture, cfg


def _disk_needed(parameters: int, dtype: str, cache: bool, quantization: Quantization) -> tuple[int, int]:
    """Bytes the export writes at its peak: (the export's graphs, the float graph a quantized export writes first).

    The quantizer writes its graph before the float one it reads is deleted (an int8 graph keeps its embedding
    table in float: at most half the bytes; an int4 one is about a quarter at most). The KV-cache graph is saved
    with its own copy of the weights (then quantized) before it is pointed at the main graph's.
    """
    graph_bytes = parameters * torch.finfo(DTYPES[dtype]).bits // 8
    quantized = {"none": 0, "int8": graph_bytes // 2, "int4": graph_bytes // 4}[quantization.method]
    if quantized:
        return (1 + cache) * quantized + (64 << 20), graph_bytes
    return (1 + cache) * graph_bytes + (64 << 20), 0


def _check_disk(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ExportError(f"not enough disk space in {folder}: the export needs about {need / 1e9:.2f} GB there, "
                          f"{free / 1e9:.2f} GB is free")


def _write_graph(trace, target: Path, what: str, *, fusion: str, required: tuple[str, ...] | None, device: str,
                 quantization: Quantization, embedding_size: int, stages: _Progress, scratch: str | Path | None):
    """Trace -> fuse (in memory) -> save -> quantize: one graph at ``target``; returns (fusions, quantized ops).

    A graph to be quantized is saved as :data:`TRACED_FILE` first (beside ``target``, or in a temporary folder in
    ``scratch``) and deleted once the quantizer has written its own.
    """
    with stages.stage(f"tracing {what} (dynamo)"):
        program = trace()
    fusions = quantized = None
    if fusion == "ort":
        with stages.stage(f"fusing {what} for onnxruntime"):
            fusions = fuse_for_onnxruntime(program.model, required, device)
    if quantization.method == "none":
        with stages.stage(f"saving {what}"):
            program.save(str(target), external_data=True)
        return fusions, quantized
    with _float_graph_folder(target.parent, scratch) as folder:
        saved = folder / TRACED_FILE
        with stages.stage(f"saving {what}" + (f" to {scratch}" if scratch is not None else "")):
            try:
                program.save(str(saved), external_data=True)
            except OSError as e:
                if scratch is None or e.errno != errno.ENOSPC:
                    raise
                raise ExportError(f"the scratch folder {scratch} is full ({e.strerror}) with the float graph; free "
                                  "space there or choose another --scratch (nothing was written)") from None
            del program
        with stages.stage(f"quantizing {what} ({quantization.variant})"):
            quantized = quantize_graph(saved, target, quantization, embedding_size)
            remove_graph(saved)
    return fusions, quantized


@contextlib.contextmanager
def _float_graph_folder(staging: Path, scratch: str | Path | None):
    """The staging folder itself, or a temporary folder in ``scratch`` that is removed however the export ends."""
    if scratch is None:
        yield staging
        return
    with tempfile.TemporaryDirectory(prefix=".llada-onnx-float-", dir=scratch) as folder:
        yield Path(folder)


def _trace_cache(graph: CachedSamplerGraph, cfg: ModelSizes, opset: int, device: str, translations: dict):
    dim = torch.export.Dim
    batch = dim("batch", min=1, max=4096)
    length = dim("length", min=2, max=cfg.max_sequence_length)
    fed = dim("fed", min=1, max=cfg.max_sequence_length)
    count = dim("count", min=1, max=cfg.max_sequence_length)
    cached = dim("cached", min=0, max=cfg.max_sequence_length)  # 0 in a refresh
    dtype = next(graph.parameters()).dtype
    ids = torch.arange(6, dtype=torch.long, device=device).reshape(2, 3) % cfg.vocab_size
    mask = torch.ones(2, 7, dtype=torch.long, device=device)
    mask[1, 0] = 0
    positions = torch.tensor([[2, 3, 4], [3, 4, 5]], dtype=torch.long, device=device)
    head = torch.tensor([[0, 2], [1, 2]], dtype=torch.long, device=device)
    # Distinct tensors, and a past length (5) unlike the others so that no two dimensions get unified.
    past = [torch.zeros(2, cfg.n_kv_heads, 5, cfg.head_dim, dtype=dtype, device=device)
            for _ in range(2 * cfg.n_layers)]
    inputs, outputs = KV_CACHE.input_names(cfg.n_layers), KV_CACHE.output_names(cfg.n_layers)
    shapes = {"input_ids": {0: batch, 1: fed}, "attention_mask": {0: batch, 1: length},
              "positions": {0: batch, 1: fed}, "head_index": {0: batch, 1: count}}
    return _export(graph, (ids, mask, positions, head, *past), opset, inputs, outputs,
                   (*shapes.values(), tuple({0: batch, 2: cached} for _ in past)), translations)


def _trace(kind: GraphKind, model, cfg: ModelSizes, opset: int, device: str, translations: dict):
    """The main graph, ``forward`` or ``block_forward`` (which also takes the block length and a past)."""
    dim = torch.export.Dim
    batch = dim("batch", min=1, max=4096)
    length = dim("length", min=2, max=cfg.max_sequence_length)
    count = dim("count", min=1, max=cfg.max_sequence_length)
    # Sample sizes other than 0/1 and distinct from each other, so no dimension gets specialised.
    ids = torch.arange(10, dtype=torch.long, device=device).reshape(2, 5) % cfg.vocab_size
    mask = torch.ones(2, 5, dtype=torch.long, device=device)
    mask[1, 0] = 0
    positions = torch.tensor([[1, 2, 4], [2, 3, 4]], dtype=torch.long, device=device)
    shapes = {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length},
              "positions": {0: batch, 1: count}}
    if kind is not BLOCK_FORWARD:
        return _export(SamplerGraph(model, device).eval(), (ids, mask, positions), opset, kind.input_names(0),
                       kind.output_names(0), shapes, translations)
    # A past of 4 positions before the 5 fed (its mask as long as the cached keys: the same dimension).
    dtype = next(model.parameters()).dtype
    past = [torch.zeros(2, cfg.n_kv_heads, 4, cfg.head_dim, dtype=dtype, device=device)
            for _ in range(2 * cfg.n_layers)]
    cached_mask = torch.ones(2, 4, dtype=torch.long, device=device)
    cached_mask[1, :2] = 0
    cached = dim("cached", min=0, max=cfg.max_sequence_length)  # 0: the full forward
    shapes.update(block_length={}, cached_mask={0: batch, 1: cached})
    return _export(BlockSamplerGraph(model, device).eval(), (ids, mask, positions, torch.tensor(3, device=device),
                                                             cached_mask, *past),
                   opset, kind.input_names(cfg.n_layers), kind.output_names(cfg.n_layers),
                   (*shapes.values(), tuple({0: batch, 2: cached} for _ in past)), translations)


def _export(graph, args, opset: int, inputs, outputs, dynamic_shapes, translations: dict):
    """``torch.onnx.export`` (dynamo) with its console chatter silenced; ``translations``: how the project's own
    ops (the MoE op) are written."""
    quiet = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        return torch.onnx.export(graph, args, dynamo=True, opset_version=int(opset), optimize=True,
                                 input_names=list(inputs), output_names=list(outputs), external_data=True,
                                 dynamic_shapes=dynamic_shapes, custom_translation_table=translations or None)


def _write_metadata(tmp: Path, ckpt: Path, architecture: Architecture, cfg, *, graphs: dict[str, str], dtype: str,
                    opset: int, fusion: str, fusions: dict[str, int] | None, quantization: Quantization,
                    quantized_ops: dict[str, int] | None, moe: str | None, experts_layout: str | None) -> None:
    import onnx
    import onnxruntime

    for name in COPIED_FILES:
        if (ckpt / name).is_file():
            shutil.copy2(ckpt / name, tmp / name)
    digest = hashlib.sha256()
    for name in ("config.json", INDEX_FILE):
        if (ckpt / name).is_file():
            digest.update((ckpt / name).read_bytes())
    provenance = {
        "source": str(ckpt),  # as given: the shipped default model records its in-repo path
        "source_sha256": digest.hexdigest(),
        "source_weight_bytes": checkpoint_bytes(ckpt),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest = manifest_dict(architecture=architecture.name, sampler=architecture.sampler, graphs=graphs,
                             sizes=architecture.sizes(cfg), dtype=dtype, opset=int(opset), ids=cfg.special_ids(),
                             chat_template=_chat_template(ckpt), model=architecture.summary(cfg),
                             provenance=provenance, fusion=fusion, fusions=fusions, variant=quantization.variant,
                             quantization=quantization.manifest(), quantized_ops=quantized_ops, moe=moe,
                             experts_layout=experts_layout)
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _chat_template(ckpt: Path) -> str | None:
    """The checkpoint's chat template: ``tokenizer_config.json``'s string, or the "default" one of its named list."""
    file = ckpt / "tokenizer_config.json"
    if not file.is_file():
        return None
    template = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) else None


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _quiet(line: str) -> None:
    pass


def _peak_rss_mb() -> float:
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


__all__ = ["DEFAULT_OPSET", "ExportError", "ExportResult", "Quantization", "ValidationError", "export", "summary"]
