"""``llada-onnx serve``: an OpenAI-compatible HTTP server with step-level continuous batching and a live page.

Needs the ``serve`` extra (FastAPI, uvicorn, sse-starlette). :mod:`.scheduler` batches concurrent generations
step by step; :mod:`.protocol` reads OpenAI requests into sampler settings; :mod:`.app` is the FastAPI
application; ``static/index.html`` the page at ``/``.
"""

from .app import API_KEY_ENV, create_app

__all__ = ["API_KEY_ENV", "create_app"]
