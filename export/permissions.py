"""File modes for export folders: they are built in a ``mkdtemp`` folder (mode 0700) and some writers
(onnxruntime's quantizer) create 0600 files; an export should end up as a plain ``mkdir`` and ``open`` make it."""

from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def chmod_like_mkdir(path: Path) -> None:
    os.chmod(path, 0o777 & ~_umask())


def chmod_files(path: Path) -> None:
    mode = 0o666 & ~_umask()
    for file in path.iterdir():
        os.chmod(file, mode)
