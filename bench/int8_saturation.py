"""What int8 costs on an x86 CPU without VNNI, emulated on any CPU: the embedded model's int8 export judged by
``llada-onnx verify`` three ways.

    python -m bench.int8_saturation [--time INT8_EXPORT] [--out bench/results/int8-saturation]

onnxruntime's default int8 matrix product (``DynamicQuantizeMatMul``: uint8 activations x int8 weights) runs on
such CPUs through VPMADDUBSW, which adds the products of adjacent input channels in pairs and clamps each pair's
sum to int16. This rewrites every ``DynamicQuantizeMatMul`` of the export into standard ops that compute the same
integer product exactly, and once more with each adjacent pair clamped to [-32768, 32767], then runs ``verify``
on the export as onnxruntime runs it here, and on the two rewrites. The rewrite without the clamp must agree with
onnxruntime (the check that it emulates the kernel); the clamped one is what a CPU without VNNI computes unless
the session asks for the exact kernels (``runtime.providers.int8_products_saturate``).

With ``--time``, one step of that int8 export (canvas 320, a 32-token block) with onnxruntime's default kernels and
with the exact ones (``session.x64quantprecision``), alternating, medians of ``--reps``: what the exact kernels
cost on this CPU.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .harness import machine
from .quantization import no_spinning
from .report import save_report, table

INT16 = (-32768.0, 32767.0)


def emulated(src: Path, dst: Path, clamp: bool) -> Path:
    """``src`` copied to ``dst`` with its main graph's ``DynamicQuantizeMatMul`` nodes as standard ops (the
    product exact, or with adjacent input-channel pairs clamped to int16 when ``clamp``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from llada_onnx.runtime.manifest import Manifest

    shutil.copytree(src, dst)
    graph_path = Manifest.load(dst).graph_path
    model = onnx.load(str(graph_path))
    weights = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type != "DynamicQuantizeMatMul":
            nodes.append(node)
            continue
        a, b, b_scale = node.input[:3]
        w = numpy_helper.to_array(weights[b]).astype(np.float32)
        k, n = w.shape
        p = node.name + "/emulated/"

        def const(name: str, value) -> str:
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), p + name))
            return p + name

        nodes += [
            helper.make_node("DynamicQuantizeLinear", [a], [p + "q", p + "a_scale", p + "a_zero"]),
            helper.make_node("Cast", [p + "q"], [p + "qf"], to=TensorProto.FLOAT),
            helper.make_node("Shape", [p + "qf"], [p + "shape"]),
            helper.make_node("Slice", [p + "shape", const("start", np.array([0])), const("end", np.array([-1]))],
                             [p + "lead"]),
            helper.make_node("Concat", [p + "lead", const("pairs", np.array([k // 2, 2, 1]))], [p + "paired"], axis=0),
            helper.make_node("Reshape", [p + "qf", p + "paired"], [p + "q_pairs"]),
            helper.make_node("Mul", [p + "q_pairs", const("w_pairs", w.reshape(k // 2, 2, n))], [p + "products"]),
            helper.make_node("ReduceSum", [p + "products", const("pair_axis", np.array([-2]))], [p + "pair_sums"],
                             keepdims=0)]
        sums = p + "pair_sums"
        if clamp:
            nodes.append(helper.make_node("Clip", [sums, const("lo", np.float32(INT16[0])),
                                                   const("hi", np.float32(INT16[1]))], [p + "clamped"]))
            sums = p + "clamped"
        nodes += [
            helper.make_node("ReduceSum", [sums, const("k_axis", np.array([-2]))], [p + "dot"], keepdims=0),
            helper.make_node("Cast", [p + "a_zero"], [p + "a_zero_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [p + "a_zero_f", const("w_sums", w.sum(0))], [p + "zero_term"]),
            helper.make_node("Sub", [p + "dot", p + "zero_term"], [p + "integer"]),
            helper.make_node("Mul", [p + "a_scale", b_scale], [p + "scale"]),
            helper.make_node("Mul", [p + "integer", p + "scale"], list(node.output))]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    read = {name for n in nodes for name in n.input}
    for unread in [t for t in model.graph.initializer if t.name not in read]:  # the int8 weights and zero points
        model.graph.initializer.remove(unread)
    graph_path.unlink()  # its weight file stays: the export's other graphs read it
    onnx.save(model, str(graph_path), save_as_external_data=True, location="emulated.data")
    return dst


def step_ms(export_dir: Path, reps: int) -> dict[str, float]:
    """Median ms of one step with onnxruntime's default int8 kernels and with the exact ones."""
    import statistics
    import time

    import onnxruntime as ort

    from llada_onnx.runtime.manifest import Manifest
    from llada_onnx.runtime.providers import EXACT_INT8_PRODUCTS

    manifest = Manifest.load(export_dir)
    ids = np.random.default_rng(0).integers(0, 1000, size=(1, 320))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "positions": np.arange(64, 96)[None]}
    sessions = {}
    for kernels, entry in (("default", "0"), ("exact", "1")):
        so = no_spinning()  # two sessions share the cores
        so.add_session_config_entry(EXACT_INT8_PRODUCTS, entry)
        sessions[kernels] = ort.InferenceSession(str(manifest.graph_path), so, providers=["CPUExecutionProvider"])
        sessions[kernels].run(["top_ids"], feeds)
    times = {kernels: [] for kernels in sessions}
    for _ in range(reps):
        for kernels, session in sessions.items():
            start = time.perf_counter()
            session.run(["top_ids"], feeds)
            times[kernels].append(time.perf_counter() - start)
    return {kernels: statistics.median(t) * 1e3 for kernels, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.int8_saturation", description=__doc__.split("\n")[0])
    p.add_argument("--time", type=Path, help="an int8 export to time with both kinds of kernels")
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--out", default="bench/results/int8-saturation")
    a = p.parse_args(argv)
    from llada_onnx.export import Quantization
    from llada_onnx.export.quantize import quantize_export
    from llada_onnx.export.verify import verify
    from llada_onnx.runtime import default_checkpoint_dir, default_onnx_dir
    from llada_onnx.runtime.providers import int8_products_saturate

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        int8 = Path(tmp) / "int8"
        quantize_export(default_onnx_dir(), int8, Quantization("int8"), progress=False)
        for name, export_dir in (("onnxruntime, this CPU", int8),
                                 ("exact products (emulated)", emulated(int8, Path(tmp) / "exact", clamp=False)),
                                 ("int16-clamped pairs (emulated)", emulated(int8, Path(tmp) / "clamped", clamp=True))):
            report = verify(default_checkpoint_dir(), export_dir)
            rows.append({"products": name, "loss_change": report["loss"]["relative_change"],
                         "tolerance": report["loss"]["tolerance"], "passed": report["passed"],
                         "decisive_top1_agreement": report["logits"]["decisive_top1_agreement"]})
    lines = table(["int8 products", "masked-token loss vs torch", "verify"],
                  [[r["products"], f"{r['loss_change']:+.2%}", "passed" if r["passed"] else "FAILED"] for r in rows])
    report = {"machine": machine(), "int8_products_saturate": int8_products_saturate(), "rows": rows}
    if a.time:
        report["step_ms"] = ms = step_ms(a.time, a.reps)
        lines += ["", f"{a.time}: one step {ms['default']:.1f} ms with the default kernels, {ms['exact']:.1f} ms "
                      f"with the exact ones ({ms['exact'] / ms['default']:.2f}x)"]
    save_report(Path(a.out), report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
