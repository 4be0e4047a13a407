"""Weight quantization of an exported graph, with onnxruntime's own quantization tools.

Two methods, both onnxruntime's own formats and kernels:

* ``int8``: ``com.microsoft`` ``DynamicQuantizeMatMul``: symmetric int8 weights per output channel, activations
  quantized per tensor at run time, as ``onnxruntime.quantization.quantize_dynamic`` quantizes them (its
  ``MatMulInteger`` pattern is what onnxruntime fuses into that op). fp32 graphs only. The embedding table stays
  in float (onnxruntime's dynamic Gather quantization is per-tensor, too coarse for a vocabulary matrix). Written
  here (:func:`quantize_matmul_int8`) rather than by ``quantize_dynamic``, which loads the float graph and holds it
  several times over (measured: 19.6 GB peak RSS for a 5.9 GB graph; LLaDA-8B's would need about 110 GB): the
  weights are read one at a time, memory-mapped, as the int4 path reads them.
* ``int4``: ``onnxruntime.quantization``'s ``MatMulNBitsQuantizer`` (kept with the kernel that runs its output, so
  the two cannot drift apart): weight-only, symmetric, blocks of ``block_size`` along the input dimension
  (``com.microsoft`` ``MatMulNBits``); the embedding table becomes ``GatherBlockQuantized``. Works on fp32 graphs
  (CPU) and fp16 graphs (CUDA); ``accuracy_level`` picks the kernel's compute type (4 = int8 dot products).

The LM head and the embedding table (the vocabulary matrices: 88% of the ~100M benchmark model, 1B of
LLaDA-8B's 8B) are quantized too unless ``keep_head``; measurements in the README. A tied head (the embedding's
transpose, computed in the graph) has no constant weight of its own, so with tied embeddings both stay in float:
a quantized copy of the table beside the float one the head needs would only add bytes.

Memory: both paths load the graph without its weights and memory-map each weight from the data file when they get
to it, so the float graph is never in RAM at once (peak: the quantized weights plus the weights left in float,
plus the largest single float matrix).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .quantize_experts import CUDA_BLOCK_SIZES, QuantizationError, experts_layout, quantize_experts, read_weight
from .staging import disk_full_is_reported, prepare_output, staged_directory

METHODS = ("none", "int8", "int4")
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits: a power of two, at least 16
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # 0: the kernel's default; 1 fp32, 2 fp16, 3 bf16, 4 int8 compute


@dataclass(frozen=True)
class Quantization:
    """What to quantize and how; ``Quantization()`` is the unquantized export."""

    method: str = "none"
    block_size: int = 32
    accuracy_level: int = 0
    keep_head: bool = False

    def check(self, dtype: str) -> None:
        if self.method not in METHODS:
            raise QuantizationError(f"unknown quantization {self.method!r}; use one of {', '.join(METHODS)}")
        if self.block_size not in BLOCK_SIZES:
            raise QuantizationError(f"block size {self.block_size} is not supported; use one of "
                                    f"{', '.join(map(str, BLOCK_SIZES))} (32 is the default, 128 the smaller file)")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise QuantizationError(f"accuracy level {self.accuracy_level} is out of range; use 0..4")
        if self.method == "int8" and dtype != "fp32":
            raise QuantizationError("dynamic int8 quantization takes an fp32 graph (it is a CPU format); "
                                    "use --dtype fp32, or --quantize int4 for an fp16 graph")

    def check_experts(self, dtype: str) -> None:
        """Quantized experts are ``QMoE`` in the layout of the provider the graph's dtype is for (see
        :mod:`.quantize_experts`): fp32 graphs for the CPU kernel (int8, int4), fp16 graphs for the CUDA kernel
        (int4, in the block sizes it was measured to compute correctly)."""
        if self.method == "int4" and experts_layout(dtype) == "cuda" and self.block_size not in CUDA_BLOCK_SIZES:
            raise QuantizationError(
                f"onnxruntime's CUDA expert kernel takes int4 blocks of {', '.join(map(str, CUDA_BLOCK_SIZES))}, "
                f"not {self.block_size}: use one of those with an fp16 export, or quantize an fp32 export for the CPU")

    @property
    def variant(self) -> str:
        """The name the manifest and the benchmarks use: ``exact``, ``int8``, ``int4-b32``, ...; ``-keephead``
        when the vocabulary matrices stay in float."""
        if self.method == "none":
            return "exact"
        name = "int8" if self.method == "int8" else f"int4-b{self.block_size}"
        return name + ("-keephead" if self.keep_head else "")

    def manifest(self) -> dict | None:
        if self.method == "none":
            return None
        info = asdict(self)
        if self.method == "int8":
            del info["block_size"], info["accuracy_level"]
        return info


def vocabulary_nodes(model, vocab_size: int) -> list[str]:
    """Names of the LM-head MatMul and the embedding Gather: the nodes whose constant weight has a
    vocabulary-sized dimension."""
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and vocab_size in weights.get(node.input[1], ()):
            names.append(node.name)
        elif node.op_type == "Gather" and vocab_size in weights.get(node.input[0], ()):
            names.append(node.name)
    return names


def shared_weight_gathers(model) -> list[str]:
    """Gathers whose table another node reads too (a tied LM head): quantizing them would keep both copies."""
    weights = {t.name for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in set(node.input) & weights:
            readers[name] = readers.get(name, 0) + 1
    return [n.name for n in model.graph.node if n.op_type == "Gather" and readers.get(n.input[0], 0) > 1]


def quantize_graph(source: Path, target: Path, quantization: Quantization, vocab_size: int) -> dict[str, int]:
    """Write the quantized form of graph ``source`` to ``target`` (``target.name + ".data"`` beside it).

    Returns how many nodes of each quantized op type the graph has now.
    """
    import onnx

    # The quantizers log every node and advise on preprocessing: silenced for the call. Importing
    # matmul_nbits_quantizer also configures the root logger at INFO (logging.basicConfig at module level), which
    # would let every later library INFO record through: the root logger is put back as it was.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logging.disable(logging.WARNING)
    try:
        if quantization.method == "int8":
            _int8(source, target, quantization, vocab_size)
        else:
            _int4(source, target, quantization, vocab_size)
    finally:
        logging.disable(logging.NOTSET)
        root.handlers[:] = handlers
        root.setLevel(level)
    ops = [n.op_type for n in onnx.load(str(target), load_external_data=False).graph.node]
    quantized = ("DynamicQuantizeMatMul", "MatMulNBits", "GatherBlockQuantized", "QMoE")
    counts = {op: ops.count(op) for op in quantized if op in ops}
    if not counts:
        raise QuantizationError(f"the quantizer found no weights to quantize in {source.name}")
    return counts


def _int8(source: Path, target: Path, q: Quantization, vocab_size: int) -> None:
    """Every MatMul with a constant float weight becomes ``DynamicQuantizeMatMul`` (the head too unless
    ``keep_head``); the attention's activation x activation MatMuls and the embedding table stay float."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source), load_external_data=False)
    quantize_experts(model, source.parent, "int8", 0)
    keep = set(vocabulary_nodes(model, vocab_size)) if q.keep_head else set()
    weights = {t.name: t for t in model.graph.initializer}
    quantized: dict[str, list[str]] = {}
    for index, node in enumerate(list(model.graph.node)):
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or weight.data_type != TensorProto.FLOAT or node.name in keep:
            continue
        if weight.name not in quantized:
            values, scales = quantize_matmul_int8(read_weight(weight, source.parent))
            names = [weight.name + suffix for suffix in ("_int8", "_scale", "_zero_point")]
            arrays = (values, scales, np.zeros(scales.shape, dtype=np.int8))
            model.graph.initializer.extend(numpy_helper.from_array(a, n) for a, n in zip(arrays, names))
            quantized[weight.name] = names
        model.graph.node.remove(node)
        model.graph.node.insert(index, helper.make_node("DynamicQuantizeMatMul", [node.input[0], *quantized[weight.name]],
                                                        list(node.output), name=node.name, domain="com.microsoft"))
    still_read = {name for node in model.graph.node for name in node.input}
    for name in quantized:
        if name not in still_read:
            model.graph.initializer.remove(weights[name])
    onnx.load_external_data_for_model(model, str(source.parent))  # what stays float: embedding, norms, kept head
    onnx.save(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
              location=target.name + ".data", size_threshold=1024)


def quantize_matmul_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A MatMul weight ``[K, N]`` -> int8 ``[K, N]`` and per-output-channel scales ``[N]``: symmetric over
    [-127, 127], rounded half to even, as ``quantize_dynamic`` quantizes (zero points 0). Column block by column
    block, so only a block's float temporaries exist at once."""
    k, n = weight.shape
    values = np.empty((k, n), dtype=np.int8)
    scales = np.empty(n, dtype=np.float32)
    for start in range(0, n, 4096):
        block = np.asarray(weight[:, start:start + 4096], dtype=np.float32)
        scale = np.abs(block).max(axis=0) / 127
        scales[start:start + 4096] = scale
        values[:, start:start + 4096] = np.clip(np.round(block / np.where(scale == 0, 1, scale)), -127, 127)
    return values, scales


def _int4(source: Path, target: Path, q: Quantization, vocab_size: int) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(source), load_external_data=False)
    quantize_experts(model, source.parent, "int4", q.block_size)
    keep = (vocabulary_nodes(model, vocab_size) if q.keep_head else []) + shared_weight_gathers(model)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=q.block_size, is_symmetric=True,
                                     accuracy_level=q.accuracy_level or None, nodes_to_exclude=keep,
                                     op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)))
    # The quantizer reads an external weight relative to the working directory; from the graph's folder it
    # memory-maps each weight when it quantizes it, instead of the whole float graph being loaded first.
    with _working_directory(source.parent):
        quantizer.process()
        onnx.load_external_data_for_model(quantizer.model.model, ".")  # what stayed float (norms, kept head)
    onnx.save(quantizer.model.model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
              location=target.name + ".data", size_threshold=1024)


def remove_graph(graph: Path) -> None:
    """A graph file and its external data file."""
    for path in (graph, graph.with_name(graph.name + ".data")):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _working_directory(path: Path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def quantize_export(export_dir: str | Path, output_dir: str | Path, quantization: Quantization, *,
                    device: str = "cpu", force: bool = False, validate: bool = True, progress: bool = True) -> dict:
    """Quantize a float export into ``output_dir`` without its checkpoint or torch: graphs quantized (the
    KV-cache graph too, sharing the weights), tokenizer files copied, manifest updated. Validation compares the
    quantized graph with the float graph it came from (itself validated against torch) and is recorded in
    ``validation.json``. Built in a staged folder (:mod:`.staging`), as the exporter's output is.
    Returns the validation report (or ``{}``)."""
    from ..runtime.manifest import MANIFEST_FILE, Manifest
    from .shared_weights import share_weights
    from .validate import validate_against_float

    source = Path(export_dir)
    manifest = Manifest.load(source)
    if manifest.raw.get("moe") == "decomposed":
        raise QuantizationError(f"{source} has its experts in standard ops (--moe decomposed), which leave them "
                                "in float; quantize an export made with --moe fused")
    if manifest.variant != "exact":
        raise QuantizationError(f"{source} is already quantized ({manifest.variant}); quantize a float export")
    quantization.check(manifest.dtype)
    if quantization.method == "none":
        raise QuantizationError("no quantization asked for: use int8 or int4")
    layout = experts_layout(manifest.dtype) if manifest.raw.get("moe") else None
    if layout:
        quantization.check_experts(manifest.dtype)
    if validate and layout == "cuda" and device != "cuda":
        raise QuantizationError("experts quantized from an fp16 export are laid out for onnxruntime's CUDA kernel "
                                "and validate there: use --device cuda, or --no-validate")
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else (lambda line: None)
    out = prepare_output(output_dir, inputs=[source], force=force, say=say)
    with disk_full_is_reported(out, None), staged_directory(out) as tmp:
        graphs = [manifest.graph] + ([manifest.cache_graph] if manifest.cache_graph else [])
        counts = {}
        for graph in graphs:
            if progress:
                print(f"quantizing {graph} ({quantization.variant}) ...", file=sys.stderr, flush=True)
            counts[graph] = quantize_graph(source / graph, tmp / graph, quantization, manifest.vocab_size)
        if manifest.cache_graph:
            share_weights(tmp / manifest.graph, tmp / manifest.cache_graph)
        skip = {MANIFEST_FILE, "validation.json", *graphs, *(g + ".data" for g in graphs)}
        for file in source.iterdir():
            if file.is_file() and file.name not in skip:
                shutil.copy2(file, tmp / file.name)
        raw = dict(manifest.raw, variant=quantization.variant, quantization=quantization.manifest(),
                   quantized_ops=counts[manifest.graph], experts_layout=layout)
        raw["provenance"] = dict(raw.get("provenance", {}), quantized_from=str(source))
        (tmp / MANIFEST_FILE).write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
        report = {}
        if validate:
            if progress:
                print("validating against the float export ...", file=sys.stderr, flush=True)
            report = validate_against_float(tmp, source, device=device)
            (tmp / "validation.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if progress:
        print(f"quantized to {out}: {sum(f.stat().st_size for f in out.glob('*.data')) / 1e6:.1f} MB of weights"
              + (f", top_ids agreement with the float graph {report['top_ids_agreement']:.2%}" if report else ""),
              file=sys.stderr)
    return report
