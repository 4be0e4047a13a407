"""``llada_onnx.json``: what an export directory holds, written by the exporter and checked by the runtime.

It names the architecture and the sampler family that drives it, the graph file of each graph kind of the
contract (:mod:`.contract`, which declares their inputs and outputs), the model sizes the runtime needs, the
special ids, the chat template, and how the graphs were made (dtype, opset, fusion, quantization, provenance).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from . import json_fields as fields
from .chat_template import compile_chat_template
from .contract import FORMAT_VERSION, GRAPH_KINDS, MAIN_KINDS, MANIFEST_FILE, ModelSizes
from .errors import NotAnExportError

ID_FIELDS = ("mask_token_id", "eos_token_id", "eot_token_id", "bos_token_id", "pad_token_id")
DTYPES = ("fp32", "fp16")
FUSIONS = ("none", "ort")
SAMPLERS = ("llada", "block_diffusion")  # sampler families of exports


@dataclasses.dataclass(frozen=True)
class Manifest:
    directory: Path
    architecture: str
    sampler: str
    graphs: dict[str, str]  # graph kind -> file
    sizes: ModelSizes
    dtype: str
    opset: int
    ids: dict[str, int]
    chat_template: str | None = None
    fusion: str = "none"
    variant: str = "exact"
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def graph(self) -> str:
        """The main graph's file (the full forward)."""
        return self.graphs[self.main_kind]

    @property
    def main_kind(self) -> str:
        return next(kind for kind in MAIN_KINDS if kind in self.graphs)

    @property
    def cache_graph(self) -> str | None:
        """The KV-cache graph's file, if the export has one."""
        return self.graphs.get("kv_cache")

    @property
    def block_diffusion(self) -> bool:
        """Whether the block-diffusion sampler (LLaDA2; its settings: ``BlockSettings``) drives this export."""
        return self.sampler == "block_diffusion"

    @property
    def graph_path(self) -> Path:
        return self.directory / self.graph

    @property
    def vocab_size(self) -> int:
        return self.sizes.vocab_size

    @property
    def max_sequence_length(self) -> int:
        return self.sizes.max_sequence_length

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
        err, where = NotAnExportError, str(file)
        version = raw.get("format_version")
        graphs = _object(raw, "graphs", where)
        unknown = sorted(set(graphs) - set(GRAPH_KINDS))
        if unknown or len(set(graphs) & set(MAIN_KINDS)) != 1:
            raise NotAnExportError(f"{where}: graphs must name one main graph ({' or '.join(MAIN_KINDS)}) and only "
                                   f"kinds of {', '.join(GRAPH_KINDS)}, got {sorted(graphs)}; re-export")
        lowest = max(GRAPH_KINDS[kind].since for kind in graphs)
        if isinstance(version, bool) or not isinstance(version, int) or not lowest <= version <= FORMAT_VERSION:
            raise NotAnExportError(
                f"{file}: format_version {version!r} is not supported by this llada-onnx for its graphs "
                f"(expects {lowest}..{FORMAT_VERSION}); re-export the checkpoint with this version")
        sizes = _object(raw, "sizes", where)
        sizes = ModelSizes(**{f.name: fields.integer(sizes, f.name, f"{where}: sizes", err)
                              for f in dataclasses.fields(ModelSizes)})
        special = _object(raw, "special_ids", where)
        ids = {k: fields.integer(special, k, f"{where}: special_ids", err, minimum=0, below=sizes.vocab_size)
               for k in ID_FIELDS}
        chat_template = raw.get("chat_template")
        if chat_template is not None:
            if not isinstance(chat_template, str):
                raise NotAnExportError(f"{where}: chat_template must be a string or null, got {chat_template!r}")
            compile_chat_template(chat_template)
        m = cls(
            directory=path,
            architecture=fields.string(raw, "architecture", where, err),
            sampler=fields.string(raw, "sampler", where, err, choices=SAMPLERS),
            graphs={kind: _file_name(graphs, kind, f"{where}: graphs") for kind in graphs},
            sizes=sizes,
            dtype=fields.string(raw, "dtype", where, err, choices=DTYPES),
            opset=fields.integer(raw, "opset", where, err),
            ids=ids,
            chat_template=chat_template,
            fusion=fields.string(raw, "fusion", where, err, choices=FUSIONS, default="none"),
            variant=fields.string(raw, "variant", where, err, default="exact"),
            raw=raw,
        )
        for graph in m.graphs.values():
            if not (path / graph).is_file():
                raise NotAnExportError(f"{path}: the graph file {graph} named in {MANIFEST_FILE} is missing")
        return m


def _object(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key)
    if not isinstance(value, dict):
        raise NotAnExportError(f"{where}: {key} must be a JSON object, got {value!r}; re-export")
    return value


def _file_name(raw: dict[str, Any], key: str, where: str) -> str:
    """A file of the export: a plain name, never a path out of the directory."""
    value = raw.get(key)
    if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value:
        raise NotAnExportError(f"{where}: {key} must be the name of a file in the export, got {value!r}")
    return value


def manifest_dict(*, architecture: str, sampler: str, graphs: dict[str, str], sizes: ModelSizes, dtype: str,
                  opset: int, ids: dict[str, int], chat_template: str | None, model: dict[str, Any],
                  provenance: dict[str, Any], variant: str = "exact", fusion: str = "none",
                  fusions: dict[str, int] | None = None, quantization: dict[str, Any] | None = None,
                  quantized_ops: dict[str, int] | None = None, moe: str | None = None,
                  experts_layout: str | None = None) -> dict[str, Any]:
    """The JSON the exporter writes."""
    return {
        "format_version": FORMAT_VERSION,
        "architecture": architecture,  # config.json's architectures[0]
        "sampler": sampler,  # the sampler family that drives the graphs
        "graphs": graphs,  # graph kind (runtime/contract.py) -> file
        "external_data": next(graphs[k] for k in MAIN_KINDS if k in graphs) + ".data",  # shared by every graph
        "dtype": dtype,
        "opset": opset,
        "variant": variant,  # "exact" (float weights), or the quantization: "int8", "int4-b32", ...
        "quantization": quantization,  # export/quantize.py Quantization as a dict, or null
        "quantized_ops": quantized_ops or {},
        "fusion": fusion,  # "none": standard ONNX ops only; "ort": onnxruntime contrib ops (CPU, CUDA)
        "fusions": fusions or {},
        "moe": moe,  # experts as onnxruntime's fused MoE kernel ("fused") or in standard ops ("decomposed"), or null
        "experts_layout": experts_layout,  # quantized experts: the provider whose QMoE kernel reads them, or null
        "sizes": dataclasses.asdict(sizes),
        "special_ids": {k: ids[k] for k in ID_FIELDS},
        "chat_template": chat_template,
        "model": model,  # the architecture's own description (informative)
        "provenance": provenance,
    }
