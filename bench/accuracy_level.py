"""The same int4 export with another MatMulNBits compute type, weights shared by hard links.

    python -m bench.accuracy_level SRC_EXPORT DST_EXPORT 4

``accuracy_level`` is an attribute of each ``MatMulNBits`` node (4: int8 dot products, which AVX-512 VNNI and AMX
run), not of its weights; this writes ``DST`` with the graphs rewritten and every other file hard-linked, so the
two levels can be timed on one machine without quantizing (or tracing) the model twice. ``QMoE`` has no such
attribute: LLaDA-MoE's experts run the same kernel at any level.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def with_accuracy_level(src: Path, dst: Path, level: int) -> int:
    """Returns how many ``MatMulNBits`` nodes were changed; the manifest records the new level."""
    import onnx

    from llada_onnx.runtime.contract import MANIFEST_FILE

    dst.mkdir(parents=True)
    changed = 0
    for file in src.iterdir():
        if file.name == MANIFEST_FILE:
            manifest = json.loads(file.read_text())
            manifest["quantization"]["accuracy_level"] = level
            (dst / file.name).write_text(json.dumps(manifest, indent=2) + "\n")
            continue
        if file.suffix != ".onnx":
            os.link(file, dst / file.name)
            continue
        graph = onnx.load(str(file), load_external_data=False)
        for node in graph.graph.node:
            if node.op_type == "MatMulNBits":
                for attr in node.attribute:
                    if attr.name == "accuracy_level":
                        attr.i = level
                        break
                else:
                    node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
                changed += 1
        onnx.save(graph, str(dst / file.name))
    return changed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("level", type=int, choices=range(5))
    a = p.parse_args()
    print(f"{with_accuracy_level(a.src, a.dst, a.level)} MatMulNBits nodes at accuracy level {a.level} in {a.dst}")


if __name__ == "__main__":
    main()
