"""Where an export is written, and how it gets there without ever destroying the user's files.

* :func:`prepare_output` runs before any work: the output is resolved (``.``, relative paths, symlinks) and may
  not be an input, contain one or lie inside one; an existing output is replaced only when it is a llada-onnx
  export (it has the manifest) or empty, and only with ``force``. Anything else is refused with the names of
  what would have been deleted.
* :func:`staged_directory` builds the export in a hidden folder beside the output, ``.<name>.partial-XXXXXXXX``,
  marked as ours by a :data:`MARKER` file, and puts it in place only once it is complete. A new output is one
  rename. An existing one keeps its directory (it may be the user's working directory): the old files move out
  manifest first and the new ones move in manifest last, so the folder never shows a manifest over a partial set.
* A hard kill (SIGKILL, the OOM killer, power loss) cannot run cleanup code: it leaves the hidden folder, as large
  as the export got (tens of GB for an 8B model). The next export to the same output finds such folders by name
  and marker, says how large they are and removes them (:func:`remove_leftovers`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..runtime.errors import LladaOnnxError
from ..runtime.manifest import MANIFEST_FILE

MARKER = ".llada-onnx-partial"
Say = Callable[[str], None]


class ExportError(LladaOnnxError, ValueError):
    """The export cannot be done as asked; the message says what to change."""


def prepare_output(output_dir: str | Path, *, inputs: Sequence[str | Path], force: bool, say: Say) -> Path:
    """The resolved output directory, checked (see the module docstring); leftovers of killed exports removed."""
    out = Path(output_dir).expanduser().resolve()
    for given in inputs:
        source = Path(given).expanduser().resolve()
        if out == source:
            raise ExportError(f"the output {out} is the input itself: choose another directory "
                              f"(e.g. {source.parent / (source.name + '-onnx')})")
        if source.is_relative_to(out):
            raise ExportError(f"the output {out} contains the input {source}: replacing it would delete the input; "
                              "choose a directory that does not contain it")
        if out.is_relative_to(source):
            raise ExportError(f"the output {out} lies inside the input {source}: choose a directory outside it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"the output {out} exists and is not a directory")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        if entries and not _is_ours(out):
            raise ExportError(
                f"output directory {out} is not empty and is not a llada-onnx export (no {MANIFEST_FILE}): it holds "
                f"{_listing(entries)}, which --force will not delete; choose a new or empty directory")
        if entries and not force:
            raise ExportError(f"output directory {out} is not empty: it holds an earlier export; pass --force to "
                              "replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out, say)
    return out


def remove_leftovers(out: Path, say: Say) -> None:
    """Remove the staging folders of earlier exports to ``out`` that were killed (not one still running)."""
    for folder in sorted(out.parent.glob(f".{out.name}.partial-*")):
        marker = folder / MARKER
        if not folder.is_dir() or folder.is_symlink() or not marker.is_file():
            continue
        owner = _read_marker(marker)
        if owner.get("host") == socket.gethostname() and _running(owner.get("pid")):
            say(f"note: {folder} belongs to an export still running (pid {owner['pid']}); left in place")
            continue
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
        shutil.rmtree(folder)
        say(f"removed {folder} ({size / 1e9:.2f} GB), left behind by an export that was killed")


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Yield an empty folder that becomes ``out`` (resolved, checked by :func:`prepare_output`) when the block
    succeeds and is removed when it fails."""
    tmp = _new_stage(out)
    try:
        yield tmp
        (tmp / MARKER).unlink()
        _give_plain_modes(tmp)
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def disk_full_is_reported(out: Path, need: int | None) -> Iterator[None]:
    """Turn a full disk during the export (another process may fill it after the up-front check) into an
    ExportError; the staged folder is already gone by then."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        needed = f": the export needs about {need / 1e9:.2f} GB there" if need else ""
        raise ExportError(f"the disk holding {out.parent} is full ({e.strerror}){needed}; free space or choose "
                          "another output directory (nothing was written)") from None


def _install(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    entries = sorted(p.name for p in out.iterdir())
    if entries and not _is_ours(out):  # something was put there while the export ran
        raise ExportError(f"output directory {out} received other files during the export ({_listing(entries)}); "
                          "export again to a new or empty directory")
    old = _new_stage(out)
    _write_marker(out / MARKER)
    for name in sorted(entries, key=lambda n: n != MANIFEST_FILE):  # the manifest first: no longer an export
        if name != MARKER:
            os.replace(out / name, old / name)
    for name in sorted(os.listdir(tmp), key=lambda n: n == MANIFEST_FILE):  # the manifest last
        os.replace(tmp / name, out / name)
    (out / MARKER).unlink()
    tmp.rmdir()
    shutil.rmtree(old)


def _new_stage(out: Path) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    _write_marker(folder / MARKER)
    return folder


def _write_marker(path: Path) -> None:
    path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n", encoding="utf-8")


def _read_marker(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _running(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _is_ours(folder: Path) -> bool:
    """An export, or one interrupted while it was being replaced."""
    return (folder / MANIFEST_FILE).is_file() or (folder / MARKER).is_file()


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return f"{len(names)} entries: {shown}, ..." if len(names) > 5 else shown


def _give_plain_modes(folder: Path) -> None:
    """mkdtemp creates 0700 and onnxruntime's quantizer 0600 files: use the modes a plain mkdir and open give."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for file in folder.iterdir():
        os.chmod(file, 0o666 & ~umask)
