"""Two graphs, one copy of the weights: point a second graph's initializers at the main graph's data file.

The KV-cache graph uses exactly the main graph's weights. Saved on its own it would carry a second copy (16 GB
more for LLaDA-8B in fp16). Each of its external tensors whose bytes are found in the main data file is
re-pointed there (matched by content, so names and constant folding may differ); whatever is not found stays in
a data file of its own.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 64 << 20


def _external(tensor) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _digest(file, offset: int, length: int) -> str:
    file.seek(offset)
    h = hashlib.sha256()
    while length > 0:
        chunk = file.read(min(CHUNK, length))
        h.update(chunk)
        length -= len(chunk)
    return h.hexdigest()


def share_weights(main_graph: Path, other_graph: Path) -> dict[str, int]:
    """Rewrite ``other_graph`` (in place) to read shared tensors from ``main_graph``'s data file."""
    import onnx
    from onnx import TensorProto

    folder = main_graph.parent
    main = onnx.load(str(main_graph), load_external_data=False)
    other = onnx.load(str(other_graph), load_external_data=False)
    index: dict[tuple[int, str], tuple[str, int]] = {}
    for t in main.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            info = _external(t)
            length = int(info["length"])
            with open(folder / info["location"], "rb") as f:
                index[(length, _digest(f, int(info.get("offset", 0)), length))] = (info["location"], int(info.get("offset", 0)))
    own_name = other_graph.name + ".data"
    old_data, new_data = folder / own_name, folder / (own_name + ".tmp")
    shared = kept = 0
    with open(new_data, "wb") as out:
        for t in other.graph.initializer:
            if t.data_location != TensorProto.EXTERNAL:
                continue
            info = _external(t)
            offset, length = int(info.get("offset", 0)), int(info["length"])
            with open(folder / info["location"], "rb") as f:
                hit = index.get((length, _digest(f, offset, length)))
                if hit is None:
                    f.seek(offset)
                    data = f.read(length)
            if hit is not None:
                location, new_offset = hit
                shared += length
            else:
                location, new_offset = own_name, out.tell()
                out.write(data)
                kept += length
            del t.external_data[:]
            for key, value in (("location", location), ("offset", str(new_offset)), ("length", str(length))):
                t.external_data.add(key=key, value=value)
    if kept:
        new_data.replace(old_data)
    else:
        new_data.unlink()
        old_data.unlink(missing_ok=True)
    onnx.save(other, str(other_graph))
    return {"shared_bytes": shared, "own_bytes": kept}
