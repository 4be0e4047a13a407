"""Exports are built in a temporary folder beside their destination and renamed into place only when complete,
so a failure or Ctrl-C never leaves a half-written export (and never touches an existing one before then)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Yield an empty folder that replaces ``out`` when the block succeeds and is removed when it fails."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _give_plain_modes(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _give_plain_modes(folder: Path) -> None:
    """mkdtemp creates 0700 and onnxruntime's quantizer 0600 files: use the modes a plain mkdir and open give."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for file in folder.iterdir():
        os.chmod(file, 0o666 & ~umask)
