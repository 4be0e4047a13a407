"""Reading and writing LLaDA checkpoints in the Hugging Face layout (safetensors only).

Loading builds the module on the meta device and then assigns each tensor as it is read from the memory-mapped
safetensors files, converting dtype one tensor at a time. Peak memory is therefore about the size of the loaded
model, not twice it: an 8B bf16 checkpoint (16 GB) loads in bf16 on a 24 GB machine. Pickled ``.bin`` files are
never opened: checkpoints come from the internet and unpickling runs arbitrary code.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch

from ..runtime import json_fields as fields
from .config import CheckpointError, CheckpointNotFoundError
from .registry import architecture_for, read_checkpoint_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the single file, or every shard named by the index."""
    index = checkpoint_dir / INDEX_FILE
    if index.is_file():
        weight_map = fields.read_object(index, CheckpointError, "download the checkpoint's file again").get(
            "weight_map")
        if not weight_map or not isinstance(weight_map, dict) or \
                not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map of tensor names to file names; "
                                  "download the checkpoint's file again")
        files = [checkpoint_dir / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise CheckpointNotFoundError(
                f"{checkpoint_dir}: shard(s) named in {INDEX_FILE} are missing: {missing[:5]}")
        return files
    single = checkpoint_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    pickled = sorted(p.name for p in checkpoint_dir.glob("*.bin"))
    hint = (f" It has {pickled[:3]}: pickled weights are not loaded for safety; convert them to safetensors first."
            if pickled else "")
    raise CheckpointNotFoundError(f"{checkpoint_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}.{hint}")


@contextlib.contextmanager
def open_weights(file: Path) -> Iterator[Any]:
    """``safe_open`` of one weight file; a damaged one (an interrupted download, most often) is a CheckpointError
    naming it, raised before any tensor is read."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError for a bad header or a short file
        size = file.stat().st_size
        raise CheckpointError(f"{file} is damaged or incomplete ({e}; {size:,} bytes): an interrupted download? "
                              "Download it again") from None
    with handle as f:
        yield f


def check_weight_files(checkpoint_dir: Path) -> list[Path]:
    """:func:`weight_files`, each opened once so that a damaged file is reported before any work starts."""
    files = weight_files(checkpoint_dir)
    for file in files:
        with open_weights(file):
            pass
    return files


def checkpoint_bytes(checkpoint_dir: str | Path) -> int:
    """Total size of the weight files, for disk-space checks before an export."""
    return sum(p.stat().st_size for p in weight_files(Path(checkpoint_dir)))


def load_model(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """The checkpoint's model (of whichever registered architecture its config names), in ``dtype``."""
    path = Path(checkpoint_dir)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; use one of {[str(d) for d in SUPPORTED_DTYPES]}")
    architecture, cfg = read_checkpoint_config(path)
    files = weight_files(path)
    with torch.device("meta"):
        model = architecture.model(cfg)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}

    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for file in files:
        with open_weights(file) as f:
            for name in f.keys():
                if name not in expected:
                    unexpected.append(name)
                    continue
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise CheckpointError(
                        f"{file.name}: tensor {name} has shape {list(shape)}, the config expects "
                        f"{list(expected[name])}")
                state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:4]}")
    if unexpected:
        raise CheckpointError(
            f"{path}: {len(unexpected)} unexpected tensor(s) the config does not describe, e.g. "
            f"{sorted(unexpected)[:4]} (is weight_tying / n_layers right?)")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def save_model(model: torch.nn.Module, out_dir: str | Path, *, max_shard_bytes: int | None = None) -> None:
    """Write ``config.json`` and the weights; shards plus an index when they exceed ``max_shard_bytes``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    config = dict(model.config.to_dict(), architectures=[architecture_for(model.config).name],
                  torch_dtype=str(next(iter(tensors.values())).dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
