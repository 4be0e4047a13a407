"""``llada_onnx.json``: the contract between an export directory and the runtime.

The exporter writes it, the runtime reads it; both import the names from here so they cannot drift apart.
Graph inputs: ``input_ids`` int64 ``[batch, length]``, ``attention_mask`` int64 ``[batch, length]`` (1 = token,
0 = pad), ``positions`` int64 ``[batch, count]``. Outputs, for those positions only: ``logits``
``[batch, count, vocab]`` (the graph's dtype), ``top_ids`` int64 ``[batch, count]`` (argmax, first index on ties)
and ``top_prob`` float32 ``[batch, count]`` (softmax probability of ``top_ids``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

MANIFEST_FILE = "llada_onnx.json"
FORMAT_VERSION = 1
INPUT_NAMES = ("input_ids", "attention_mask", "positions")
OUTPUT_NAMES = ("logits", "top_ids", "top_prob")
ID_FIELDS = ("mask_token_id", "eos_token_id", "eot_token_id", "bos_token_id", "pad_token_id")


class NotAnExportError(FileNotFoundError):
    """The directory is not a llada-onnx export (or a damaged one)."""


@dataclasses.dataclass(frozen=True)
class Manifest:
    directory: Path
    graph: str
    dtype: str
    opset: int
    vocab_size: int
    max_sequence_length: int
    ids: dict[str, int]
    inputs: tuple[str, ...] = INPUT_NAMES
    outputs: tuple[str, ...] = OUTPUT_NAMES
    chat_template: str | None = None
    fusion: str = "none"
    cache_graph: str | None = None
    variant: str = "exact"
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def graph_path(self) -> Path:
        return self.directory / self.graph

    def id(self, name: str) -> int:
        return self.ids[name]

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        path = Path(directory)
        if not path.is_dir():
            raise NotAnExportError(f"model directory not found: {path}")
        file = path / MANIFEST_FILE
        if not file.is_file():
            hint = (" It looks like a Hugging Face checkpoint: export it first with "
                    f"`llada-onnx export {path} OUTPUT_DIR`." if (path / "config.json").is_file() else "")
            raise NotAnExportError(f"{path} is not a llada-onnx export: {MANIFEST_FILE} is missing.{hint}")
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
            version = raw.get("format_version")
            if version != FORMAT_VERSION:
                raise NotAnExportError(
                    f"{file}: format_version {version!r} is not supported by this llada-onnx "
                    f"(expects {FORMAT_VERSION}); re-export the checkpoint with this version")
            m = cls(
                directory=path,
                graph=raw["graph"],
                dtype=raw["dtype"],
                opset=int(raw["opset"]),
                vocab_size=int(raw["vocab_size"]),
                max_sequence_length=int(raw["max_sequence_length"]),
                ids={k: int(raw["special_ids"][k]) for k in ID_FIELDS},
                inputs=tuple(raw["inputs"]),
                outputs=tuple(raw["outputs"]),
                chat_template=raw.get("chat_template"),
                fusion=raw.get("fusion", "none"),
                cache_graph=raw.get("cache_graph"),
                variant=raw.get("variant", "exact"),
                raw=raw,
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, NotAnExportError):
                raise
            raise NotAnExportError(f"{file} is damaged or incomplete ({type(e).__name__}: {e}); re-export") from None
        for graph in filter(None, (m.graph, m.cache_graph)):
            if not (path / graph).is_file():
                raise NotAnExportError(f"{path}: the graph file {graph} named in {MANIFEST_FILE} is missing")
        return m


def manifest_dict(*, graph: str, dtype: str, opset: int, vocab_size: int, max_sequence_length: int,
                  ids: dict[str, int], chat_template: str | None, model: dict[str, Any],
                  provenance: dict[str, Any], variant: str = "exact", fusion: str = "none",
                  fusions: dict[str, int] | None = None, cache_graph: str | None = None,
                  quantization: dict[str, Any] | None = None,
                  quantized_ops: dict[str, int] | None = None) -> dict[str, Any]:
    """The JSON the exporter writes (see the module docstring for the I/O contract)."""
    return {
        "format_version": FORMAT_VERSION,
        "graph": graph,
        "external_data": graph + ".data",
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
        "dtype": dtype,
        "opset": opset,
        "variant": variant,  # "exact" (float weights), or the quantization: "int8", "int4-b32", ...
        "quantization": quantization,  # export/quantize.py Quantization as a dict, or null
        "quantized_ops": quantized_ops or {},
        "fusion": fusion,  # "none": standard ONNX ops only; "ort": onnxruntime contrib ops (CPU, CUDA)
        "fusions": fusions or {},
        "cache_graph": cache_graph,  # the block-wise KV-cache graph (export/graph.py CachedSamplerGraph), or null
        "vocab_size": vocab_size,
        "max_sequence_length": max_sequence_length,
        "special_ids": {k: ids[k] for k in ID_FIELDS},
        "chat_template": chat_template,
        "model": model,
        "provenance": provenance,
    }
