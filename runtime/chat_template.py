"""Chat templates: jinja code from a downloaded file, compiled as transformers compiles it, in a sandbox.

The immutable sandbox and transformers' environment (trim_blocks, lstrip_blocks, loop controls, ``tojson``) give
the string ``tokenizer.apply_chat_template(..., add_generation_prompt=True, tokenize=False)`` would, while the
template cannot reach Python objects beyond what it is handed.
"""

from __future__ import annotations

import json

from .errors import InputError, NotAnExportError


def compile_chat_template(source: str):
    """A checkpoint's jinja chat template, compiled in jinja2's immutable sandbox with transformers' settings;
    a syntax error is a NotAnExportError naming the line."""
    from jinja2 import TemplateSyntaxError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise InputError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateSyntaxError as e:
        problem = str(e.message).rstrip(".")
        raise NotAnExportError(f"the chat template has a syntax error at line {e.lineno}: {problem}; fix "
                               "chat_template in the export's llada_onnx.json or re-export") from None
