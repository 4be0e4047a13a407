"""The dual-cache step's attention alone, in onnxruntime, in the cache graph's two forms and under each kernel.

    python -m bench.cached_attention --config config.json [--past 1056] [--block 32] [--provider cuda]
        [--sdpa-kernels 0,1,2,8]

Every layer of the dual-cache step attends its 32 block tokens over the keys cached for the rest of the canvas.
A CUDA export writes that as one ``com.microsoft.MultiHeadAttention`` with ``past_key`` / ``past_value``
(``export/fusion.py`` ``attend_cached_in_one_op``); a CPU export keeps the traced form (scores against the past
and against the fresh keys, joined, plus the bias, softmax, the two value products and their sum). This builds
both for the config's heads and layers (fp16 on CUDA, fp32 on the CPU; random queries, keys and cache, each
layer with a cache of its own as in the step, so that no layer finds another's in the GPU's L2; each layer's
output is the next one's queries), checks that they agree, and times each: replayed as a CUDA graph on
CUDA, as the runtime replays its steps; medians over ``--reps``. ``MultiHeadAttention`` runs once per value of
onnxruntime's ``sdpa_kernel`` CUDA option (its attention-kernel bitmask: 0 its own choice, 1 flash, 2 memory
efficient, 8 cuDNN flash, 16 unfused; a kernel that cannot take the attention bias falls back to the unfused one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .cache_step import timed
from .harness import machine
from .report import save_report, table

# The exported graphs' IR version: onnx writes its newest by default, which older onnxruntime releases (1.31, the
# GPU machine's) refuse to load.
IR_VERSION = 10


def _model(nodes, out: str, shapes: dict[str, list[int]], dtype) -> bytes:
    """The serialized model of ``nodes`` with inputs ``shapes`` and the queries' shape as its output ``out``."""
    from onnx import helper

    inputs = [helper.make_tensor_value_info(name, dtype, shape) for name, shape in shapes.items()]
    graph = helper.make_graph(nodes, "cached_attention", inputs,
                              [helper.make_tensor_value_info(out, dtype, shapes["q"])])
    return helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def one_op(layers: int, heads: int, scale: float) -> tuple[list, str]:
    """``layers`` ``MultiHeadAttention`` nodes with a past, as ``attend_cached_in_one_op`` writes them."""
    from onnx import helper

    nodes, x = [], "q"
    for i in range(layers):
        nodes.append(helper.make_node("MultiHeadAttention", [x, "k", "v", "", "", "bias", f"past_k{i}", f"past_v{i}"],
                                      [f"out{i}", f"present_k{i}", f"present_v{i}"], domain="com.microsoft",
                                      num_heads=heads, scale=scale))
        x = f"out{i}"
    return nodes, x


def traced(layers: int, heads: int, head_dim: int, past: int, block: int, scale: float, dtype) -> tuple[list, str]:
    """``layers`` attentions in the traced form, the fresh keys' and values' heads computed once (the cache
    graph computes them once a layer, from its own projections)."""
    from onnx import helper

    def ints(name, values):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, 7, [len(values)], values))

    node = helper.make_node
    nodes = [ints("heads_shape", [0, 0, heads, head_dim]), ints("flat_shape", [0, 0, heads * head_dim]),
             ints("parts", [past, block]),
             node("Constant", [], ["scale"], value=helper.make_tensor("scale", dtype, [], [scale])),
             node("Reshape", ["k", "heads_shape"], ["k_heads"]),
             node("Transpose", ["k_heads"], ["k_t"], perm=[0, 2, 3, 1]),
             node("Reshape", ["v", "heads_shape"], ["v_heads"]),
             node("Transpose", ["v_heads"], ["v_h"], perm=[0, 2, 1, 3])]
    x = "q"
    for i in range(layers):
        p = f"l{i}_"
        nodes += [node("Reshape", [x, "heads_shape"], [p + "q_heads"]),
                  node("Transpose", [p + "q_heads"], [p + "q_h"], perm=[0, 2, 1, 3]),
                  node("Mul", [p + "q_h", "scale"], [p + "q_scaled"]),
                  node("Transpose", [f"past_k{i}"], [p + "past_k_t"], perm=[0, 1, 3, 2]),
                  node("MatMul", [p + "q_scaled", p + "past_k_t"], [p + "scores_past"]),
                  node("MatMul", [p + "q_scaled", "k_t"], [p + "scores_fresh"]),
                  node("Concat", [p + "scores_past", p + "scores_fresh"], [p + "scores"], axis=-1),
                  node("Add", [p + "scores", "bias"], [p + "biased"]),
                  node("Softmax", [p + "biased"], [p + "weights"], axis=-1),
                  node("Split", [p + "weights", "parts"], [p + "w_past", p + "w_fresh"], axis=-1),
                  node("MatMul", [p + "w_past", f"past_v{i}"], [p + "out_past"]),
                  node("MatMul", [p + "w_fresh", "v_h"], [p + "out_fresh"]),
                  node("Add", [p + "out_past", p + "out_fresh"], [p + "out_h"]),
                  node("Transpose", [p + "out_h"], [p + "out_t"], perm=[0, 2, 1, 3]),
                  node("Reshape", [p + "out_t", "flat_shape"], [f"out{i}"])]
        x = f"out{i}"
    return nodes, x


def _time(blob: bytes, out: str, feeds: dict, provider: str, sdpa_kernel: int, reps: int) -> tuple[float, np.ndarray]:
    """Median ms of one call through IOBinding (replayed as a CUDA graph on CUDA) and the output."""
    import onnxruntime as ort

    device = "cuda" if provider == "cuda" else "cpu"
    options = {"enable_cuda_graph": "1", **({"sdpa_kernel": str(sdpa_kernel)} if sdpa_kernel else {})}
    providers = ([("CUDAExecutionProvider", options), "CPUExecutionProvider"]
                 if provider == "cuda" else ["CPUExecutionProvider"])
    session = ort.InferenceSession(blob, providers=providers)
    binding = session.io_binding()
    held = {name: ort.OrtValue.ortvalue_from_numpy(value, device, 0) for name, value in feeds.items()}
    for name, value in held.items():
        binding.bind_ortvalue_input(name, value)
    result = ort.OrtValue.ortvalue_from_shape_and_type(list(feeds["q"].shape), feeds["q"].dtype, device, 0)
    binding.bind_ortvalue_output(out, result)
    return timed(lambda: session.run_with_iobinding(binding), reps), result.numpy()


def measure(*, heads: int, head_dim: int, layers: int, past: int, block: int, provider: str,
            sdpa_kernels: list[int], reps: int) -> list[dict]:
    from onnx import TensorProto

    dtype, np_dtype = (TensorProto.FLOAT16, np.float16) if provider == "cuda" else (TensorProto.FLOAT, np.float32)
    rng = np.random.default_rng(0)
    width = heads * head_dim
    shapes = {"q": [1, block, width], "k": [1, block, width], "v": [1, block, width],
              "bias": [1, 1, block, past + block]}
    shapes.update({f"past_{kv}{i}": [1, heads, past, head_dim] for i in range(layers) for kv in "kv"})
    feeds = {name: (np.zeros(shape) if name == "bias" else rng.standard_normal(shape)).astype(np_dtype)
             for name, shape in shapes.items()}
    scale = head_dim ** -0.5
    forms = [("traced", 0, traced(layers, heads, head_dim, past, block, scale, dtype))]
    forms += [("MultiHeadAttention", k, one_op(layers, heads, scale))
              for k in (sdpa_kernels if provider == "cuda" else [0])]
    rows, reference = [], None
    for form, sdpa_kernel, (nodes, out) in forms:
        ms, output = _time(_model(nodes, out, shapes, dtype), out, feeds, provider, sdpa_kernel, reps)
        reference = output if reference is None else reference
        rows.append({"form": form, "sdpa_kernel": sdpa_kernel, "ms": ms,
                     "ms_per_layer": ms / layers,
                     "max_abs_diff": float(np.abs(output.astype(np.float32) - reference.astype(np.float32)).max())})
    return rows


def markdown(report: dict) -> str:
    s = report["shape"]
    lines = [f"{s['layers']} layers, {s['heads']} heads x {s['head_dim']}, {s['block']} block tokens over "
             f"{s['past']} cached, {report['provider']}, medians of {report['reps']}"
             f"{' (replayed as CUDA graphs)' if report['provider'] == 'cuda' else ''}:", ""]
    lines += table(["form", "sdpa_kernel", "ms (all layers)", "ms / layer", "max abs diff vs traced"],
                   [[r["form"], r["sdpa_kernel"], f"{r['ms']:.3f}", f"{r['ms_per_layer']:.4f}",
                     f"{r['max_abs_diff']:.2g}"] for r in report["results"]])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from llada_onnx.models.config import LLaDAConfig

    p = argparse.ArgumentParser(prog="python -m bench.cached_attention", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="config.json giving the heads and layers (e.g. LLaDA-8B's)")
    p.add_argument("--n-layers", type=int, help="override the config's layer count")
    p.add_argument("--past", type=int, default=1056, help="cached tokens (canvas minus block; 1088 - 32)")
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--sdpa-kernels", default="0,1,2,8", help="onnxruntime sdpa_kernel values to time (CUDA)")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--out", default="bench/results/cached-attention")
    a = p.parse_args(argv)
    config = LLaDAConfig.from_dict(json.loads(Path(a.config).read_text()), source=a.config)
    if config.n_kv_heads != config.n_heads:
        raise SystemExit("this config uses grouped-query attention, whose cache attention the exporter keeps traced")
    shape = {"heads": config.n_heads, "head_dim": config.head_dim, "layers": a.n_layers or config.n_layers,
             "past": a.past, "block": a.block}
    results = measure(**shape, provider=a.provider, sdpa_kernels=[int(k) for k in a.sdpa_kernels.split(",")],
                      reps=a.reps)
    report = {"shape": shape, "provider": a.provider, "reps": a.reps, "machine": machine(), "results": results}
    save_report(Path(a.out), report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
