"""The HTTP server: OpenAI-compatible endpoints over the continuous-batching scheduler, and the web page.

``POST /v1/completions`` and ``/v1/chat/completions`` (streaming with ``stream: true``: Server-Sent Events in
OpenAI's chunk format, ending with ``[DONE]``), ``GET /v1/models``, ``GET /health`` and the page at ``/``. Every
refusal is a 4xx whose JSON body is OpenAI's ``{"error": {"message": ...}}``; the server keeps serving.

Streaming sends the *final* text as it grows (see :class:`~.protocol.FinalText`); with the extension field
``stream_canvas: true`` each chunk also carries ``canvas``: the whole generated span, ``null`` where still
masked, which is what the web page draws.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import uuid
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse
from sse_starlette.sse import EventSourceResponse

from ..runtime.block_sampler import BlockStepInfo
from ..runtime.errors import LladaOnnxError
from ..runtime.noise import Noise
from ..runtime.pipeline import Pipeline
from .protocol import FinalText, Request, RequestError, canvas_view, read_request
from .scheduler import QueueFull, Scheduler

API_KEY_ENV = "LLADA_ONNX_API_KEY"


def create_app(pipeline: Pipeline, *, model_name: str, defaults: dict[str, Any] | None = None, seed: int = 0,
               api_key: str | None = None, max_batch: int = 16, max_queue: int = 64):
    """The FastAPI application; ``defaults`` (sampler settings) and ``seed`` apply where a request says nothing."""
    scheduler = Scheduler(pipeline, max_batch=max_batch, max_queue=max_queue)
    codec = pipeline.codec
    defaults = dict(defaults or {})
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
    fingerprint = f"llada-onnx-{os.getpid()}"  # which server process (replica) answered

    app = FastAPI(title="llada-onnx", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler

    @app.on_event("shutdown")
    def _close() -> None:
        scheduler.close()

    def error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                            status_code=status, headers=headers)

    @app.middleware("http")
    async def authorise(request: HTTPRequest, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(401, "missing or wrong API key: send the header Authorization: Bearer KEY",
                             "authentication_error")
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_name, "sampler": pipeline.manifest.sampler, "pid": os.getpid(),
                **scheduler.load}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "llada-onnx",
                                            "chat": codec.has_chat_template}]}

    async def complete(http: HTTPRequest, chat: bool):
        try:
            body = json.loads(await http.body())
        except (ValueError, UnicodeDecodeError):
            return error(400, "the request body is not valid JSON")
        try:
            request = read_request(body, chat=chat, defaults=defaults, seed=seed,
                                   block_diffusion=pipeline.block_diffusion)
            if chat and not codec.has_chat_template:
                raise RequestError(f"{model_name} is a base model without a chat template: use /v1/completions")
            ids = codec.encode(codec.prompt_texts([request.prompt] if chat else request.prompt, chat)[0])
            if not ids:
                raise RequestError("the prompt encodes to no tokens")
            run = pipeline.new_run(np.asarray([ids]), None, request.settings, Noise.of(None, request.seed))
        except LladaOnnxError as e:
            return error(400, e.render({"gen_length": "max_tokens"}))
        stream = _Stream(request, codec, len(ids), asyncio.get_running_loop())
        try:
            job = scheduler.submit(run, request.settings, stream.on_step, stream.on_end)
        except QueueFull as e:
            return error(429, str(e), "rate_limit_error", headers={"Retry-After": "1"})
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": model_name, "system_fingerprint": fingerprint}
        usage = lambda: {"prompt_tokens": len(ids), "completion_tokens": stream.final.tokens,  # noqa: E731
                         "total_tokens": len(ids) + stream.final.tokens}
        if request.stream:
            return EventSourceResponse(_chunks(stream, job, meta, chat, usage), ping=15)
        try:
            failure = await stream.finished()
        except asyncio.CancelledError:
            job.cancel()
            raise
        if failure is not None:
            return error(500, f"generation failed: {failure}", "server_error")
        choice = ({"index": 0, "message": {"role": "assistant", "content": stream.final.text},
                   "finish_reason": stream.final.finish_reason} if chat else
                  {"index": 0, "text": stream.final.text, "finish_reason": stream.final.finish_reason,
                   "logprobs": None})
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": usage()}

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        return await complete(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        return await complete(http, chat=True)

    return app


class _Stream:
    """One request's events, from the scheduler thread to its HTTP handler."""

    def __init__(self, request: Request, codec, prompt_len: int, loop: asyncio.AbstractEventLoop):
        self.request, self.codec, self.prompt_len, self.loop = request, codec, prompt_len, loop
        self.gen_length = request.settings.gen_length
        self.final = FinalText(codec, prompt_len, self.gen_length, request.stop)
        self.events: asyncio.Queue = asyncio.Queue()

    def on_step(self, info) -> bool | None:  # on the scheduler thread
        row = info.canvas[0]
        new = self.final.update(row, info.final_until[0] if isinstance(info, BlockStepInfo) else None)
        if self.request.stream and (new or self.request.stream_canvas):
            canvas = (canvas_view(self.codec, row, self.prompt_len, self.gen_length) if self.request.stream_canvas
                      else None)
            self.loop.call_soon_threadsafe(self.events.put_nowait, ("step", new, canvas))
        return False if self.final.finished else None

    def on_end(self, failure) -> None:  # on the scheduler thread
        self.final.finished = True
        self.loop.call_soon_threadsafe(self.events.put_nowait, ("end", failure, None))

    async def finished(self):
        while True:
            kind, value, _ = await self.events.get()
            if kind == "end":
                return value


async def _chunks(stream: _Stream, job, meta: dict, chat: bool, usage):
    """OpenAI's streaming chunks, then ``[DONE]``; a client that goes away cancels its request."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, canvas=None, first: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant", "content": ""} if first else {} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        out = {**meta, "object": kind, "choices": [choice]}
        if canvas is not None:
            out["canvas"] = canvas
        return json.dumps(out)

    try:
        if chat:
            yield {"data": chunk(None, None, first=True)}
        while True:
            event, value, canvas = await stream.events.get()
            if event == "end":
                if value is not None:
                    yield {"data": json.dumps({"error": {"message": f"generation failed: {value}",
                                                         "type": "server_error"}})}
                    break
                yield {"data": chunk(None, stream.final.finish_reason)}
                if stream.request.include_usage:
                    yield {"data": json.dumps({**meta, "object": kind, "choices": [], "usage": usage()})}
                break
            yield {"data": chunk(value, None, canvas)}
        yield {"data": "[DONE]"}
    finally:
        job.cancel()  # a no-op for a finished request; frees the slot of one whose client went away
