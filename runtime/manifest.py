"""``llada_onnx.json``: the contract between an export directory and the runtime.

The exporter writes it, the runtime reads it; both import the names from here so they cannot drift apart.
Graph inputs: ``input_ids`` int64 ``[batch, length]``, ``attention_mask`` int64 ``[batch, length]`` (1 = token,
0 = pad), ``positions`` int64 ``[batch, count]``. Outputs, for those positions only: ``logits``
``[batch, count, vocab]`` (the graph's dtype), ``top_ids`` int64 ``[batch, count]`` (argmax, first index on ties)
and ``top_prob`` float32 ``[batch, count]`` (softmax probability of ``top_ids``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from . import json_fields as fields
from .chat_template import compile_chat_template
from .errors import NotAnExportError

MANIFEST_FILE = "llada_onnx.json"
FORMAT_VERSION = 1
INPUT_NAMES = ("input_ids", "attention_mask", "positions")
OUTPUT_NAMES = ("logits", "top_ids", "top_prob")
ID_FIELDS = ("mask_token_id", "eos_token_id", "eot_token_id", "bos_token_id", "pad_token_id")
DTYPES = ("fp32", "fp16")
FUSIONS = ("none", "ort")
CACHE_SIZES = ("d_model", "n_heads", "n_kv_heads")  # what the KV-cache session reads from the manifest's model


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
        """Read and check ``llada_onnx.json``: every field's type and range, every special id inside the
        vocabulary, the chat template compiled, the graph files present. Whatever is wrong is a NotAnExportError
        naming the field, here and not at the first onnxruntime call."""
        path = Path(directory)
        if not path.is_dir():
            raise NotAnExportError(f"model directory not found: {path}")
        file = path / MANIFEST_FILE
        if not file.is_file():
            hint = (" It looks like a Hugging Face checkpoint: export it first with "
                    f"`llada-onnx export {path} OUTPUT_DIR`." if (path / "config.json").is_file() else "")
            raise NotAnExportError(f"{path} is not a llada-onnx export: {MANIFEST_FILE} is missing.{hint}")
        raw = fields.read_object(file, NotAnExportError, "re-export")
        err, where = NotAnExportError, f"{file}"
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise NotAnExportError(
                f"{file}: format_version {version!r} is not supported by this llada-onnx "
                f"(expects {FORMAT_VERSION}); re-export the checkpoint with this version")
        vocab_size = fields.integer(raw, "vocab_size", where, err)
        special = raw.get("special_ids")
        if not isinstance(special, dict):
            raise NotAnExportError(f"{where}: special_ids must be an object of token ids, got {special!r}")
        ids = {k: fields.integer(special, k, f"{where}: special_ids", err, minimum=0, below=vocab_size)
               for k in ID_FIELDS}
        names = {}
        for key in ("inputs", "outputs"):
            value = raw.get(key)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise NotAnExportError(f"{where}: {key} must be a list of graph names, got {value!r}")
            names[key] = tuple(value)
        chat_template = raw.get("chat_template")
        if chat_template is not None:
            if not isinstance(chat_template, str):
                raise NotAnExportError(f"{where}: chat_template must be a string or null, got {chat_template!r}")
            compile_chat_template(chat_template)
        m = cls(
            directory=path,
            graph=_file_name(raw, "graph", where),
            dtype=fields.string(raw, "dtype", where, err, choices=DTYPES),
            opset=fields.integer(raw, "opset", where, err),
            vocab_size=vocab_size,
            max_sequence_length=fields.integer(raw, "max_sequence_length", where, err),
            ids=ids,
            inputs=names["inputs"],
            outputs=names["outputs"],
            chat_template=chat_template,
            fusion=fields.string(raw, "fusion", where, err, choices=FUSIONS, default="none"),
            cache_graph=_file_name(raw, "cache_graph", where) if raw.get("cache_graph") is not None else None,
            variant=fields.string(raw, "variant", where, err, default="exact"),
            raw=raw,
        )
        if m.cache_graph:
            model = raw.get("model")
            if not isinstance(model, dict):
                raise NotAnExportError(f"{where}: model must be an object of the model's sizes, got {model!r}")
            for key in CACHE_SIZES:
                fields.integer(model, key, f"{where}: model", err)
        for graph in filter(None, (m.graph, m.cache_graph)):
            if not (path / graph).is_file():
                raise NotAnExportError(f"{path}: the graph file {graph} named in {MANIFEST_FILE} is missing")
        return m


def _file_name(raw: dict[str, Any], key: str, where: str) -> str:
    """A file of the export: a plain name, never a path out of the directory."""
    value = raw.get(key)
    if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value:
        raise NotAnExportError(f"{where}: {key} must be the name of a file in the export, got {value!r}")
    return value


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
