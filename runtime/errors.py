"""The package's own exceptions: every error a user can cause is a :class:`LladaOnnxError`.

The split is what lets the CLI (and later the server) tell the user's mistakes from llada-onnx's bugs: a
``LladaOnnxError`` is printed as one line that says what is wrong and what to do (exit 2, HTTP 4xx); any other
exception escaping is a bug and keeps its traceback. Each subclass also derives from the builtin type a caller
would have caught before (``ValueError``, ``FileNotFoundError``, ``RuntimeError``).

Messages may quote the name of a setting in backticks (```block_length```, ```chat=False```): ``str(error)``
shows the Python name, and :meth:`LladaOnnxError.render` lets a front end show its own spelling of it (the CLI's
``--block-length``, ``--raw``).
"""

from __future__ import annotations

import re
from typing import Mapping

_QUOTED = re.compile(r"`([^`]+)`")


class LladaOnnxError(Exception):
    """Something the user gave or asked for cannot be used; the message says what to change."""

    def render(self, names: Mapping[str, str] | None = None) -> str:
        """The message with each quoted name replaced by ``names[name]`` (or left as the name)."""
        names = names or {}
        return _QUOTED.sub(lambda m: names.get(m.group(1), m.group(1)), super().__str__())

    def __str__(self) -> str:
        return self.render()


class InputError(LladaOnnxError, ValueError):
    """A request that cannot run: a sampler setting out of range, an unusable prompt or prompt file."""


class NotAnExportError(LladaOnnxError, FileNotFoundError):
    """The directory is not a llada-onnx export, or a file of the export is missing or damaged (named)."""
