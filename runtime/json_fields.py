"""Typed reads of the JSON files a checkpoint or an export holds, failing with a message that names the file and
the field.

Those files come from downloads, hand edits and older tools: a field can be missing, ``null``, a string where a
number belongs, or the whole file a list. Each reader returns the value in its Python type or raises the
caller's error type (an :class:`~.errors.LladaOnnxError`) saying which field of which file is wrong and what it
must be, so no ``KeyError``, ``ZeroDivisionError`` or ``int("abc")`` ever reaches the user.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import LladaOnnxError

_MISSING = object()


def read_object(path: Path, error: type[LladaOnnxError], hint: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``hint`` (e.g. "re-export") ends the message of a damaged file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); {hint}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); {hint}") from None
    if not isinstance(raw, dict):
        raise error(f"{path} must hold a JSON object, not a {type(raw).__name__}; {hint}")
    return raw


def integer(raw: dict[str, Any], key: str, where: str, error: type[LladaOnnxError], *, minimum: int = 1,
            below: int | None = None, default: Any = _MISSING) -> int:
    """``raw[key]`` as an int in ``[minimum, below)``; ``default`` when the key is absent or null, if given."""
    value = _get(raw, key, where, error, default)
    if value is default and default is not _MISSING:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{where}: {key} must be an integer, got {value!r}")
    if value < minimum or (below is not None and value >= below):
        bound = f"in [{minimum}, {below})" if below is not None else f">= {minimum}"
        raise error(f"{where}: {key} must be {bound}, got {value}")
    return value


def number(raw: dict[str, Any], key: str, where: str, error: type[LladaOnnxError], *,
           default: Any = _MISSING) -> float:
    """``raw[key]`` as a finite float > 0."""
    value = _get(raw, key, where, error, default)
    if value is default and default is not _MISSING:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise error(f"{where}: {key} must be a positive number, got {value!r}")
    return float(value)


def string(raw: dict[str, Any], key: str, where: str, error: type[LladaOnnxError], *,
           choices: tuple[str, ...] | None = None, default: Any = _MISSING) -> str:
    value = _get(raw, key, where, error, default)
    if value is default and default is not _MISSING:
        return value
    if not isinstance(value, str) or (choices is not None and value not in choices):
        expected = f"one of {', '.join(choices)}" if choices else "a string"
        raise error(f"{where}: {key} must be {expected}, got {value!r}")
    return value


def _get(raw: dict[str, Any], key: str, where: str, error: type[LladaOnnxError], default: Any) -> Any:
    value = raw.get(key)
    if value is None:
        if default is _MISSING:
            raise error(f"{where}: required field {key} is missing")
        return default
    return value
