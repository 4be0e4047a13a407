"""Step-level continuous batching: concurrent generations share each model call.

Every request is its own :class:`~llada_onnx.runtime.sampler.SamplerRun` (its own settings, noise, canvas and
block/step counters). One scheduler thread owns the graph session and loops: admit waiting requests while the
running batch has room (``max_batch`` rows of the model call: a CFG request counts two), ask every running
request for its next step, answer all exact-sampler steps with **one** forward call (two when some requests sample
and need the logits: the greedy ones never copy vocabulary-sized rows), and hand each request its rows of the answer. A request joins at the next step and leaves when it is finished, cancelled (its client went
away) or failed; nothing waits for a batch to drain.

Canvases of different lengths are **right**-padded to the longest one (pad id, attention mask 0): each real token
keeps its position, so its rotary angles are those of the request run alone, and the padded keys are masked out.
Requests that decode with a KV cache keep their own cache and run as their own model call within the same tick;
so do block-diffusion requests (LLaDA2's :class:`~llada_onnx.runtime.block_sampler.BlockRun`, whose exact block
cache is its own): the scheduler interleaves their steps with everyone else's.

Each request's step callback runs on the scheduler thread; it must be quick (the server's pushes an event onto
the client's queue) and may return ``False`` to finish the request early (e.g. at its first EOS).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..runtime.block_sampler import BlockRun
from ..runtime.errors import LladaOnnxError
from ..runtime.pipeline import Pipeline
from ..runtime.sampler import SamplerRun, StepInfo, model_call
from ..runtime.contract import StepOutput


class QueueFull(LladaOnnxError, RuntimeError):
    """More requests are waiting than the server queues; retry later."""


@dataclass(eq=False)
class Job:
    """One request in the scheduler. ``on_step`` sees each step (return ``False`` to finish); ``on_end`` is called
    once, with the exception that ended it or ``None``."""

    run: SamplerRun | BlockRun
    rows: int  # rows of the model call
    on_step: Callable[[StepInfo], Optional[bool]]
    on_end: Callable[[Optional[BaseException]], None]
    call: object | None = None  # a request with a KV cache has its own model call; None: the shared forward
    cancelled: threading.Event = field(default_factory=threading.Event)
    ended: bool = False

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    def __init__(self, pipeline: Pipeline, *, max_batch: int = 16, max_queue: int = 64):
        self.pipeline, self.max_batch, self.max_queue = pipeline, max_batch, max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._wake = threading.Condition()
        self._stop = False
        self.steps = 0  # model calls made, for /health and the benchmarks
        self._thread = threading.Thread(target=self._loop, name="llada-onnx-scheduler", daemon=True)
        self._thread.start()

    def submit(self, run: SamplerRun | BlockRun, settings, on_step, on_end) -> Job:
        """Queue a request; raises :class:`QueueFull` when ``max_queue`` requests are already waiting."""
        if isinstance(run, BlockRun):
            rows, call = run.canvas.shape[0], run.call
        else:
            rows = run.canvas.shape[0] * (2 if run.cfg else 1)
            call = None if settings.cache == "none" else model_call(self.pipeline.graph, settings,
                                                                    self.pipeline.kv_cache)
        job = Job(run, rows, on_step, on_end, call)
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting; retry later")
            self._waiting.append(job)
            self._wake.notify()
        return job

    @property
    def load(self) -> dict:
        return {"running": len(self._running), "waiting": len(self._waiting), "model_calls": self.steps}

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._running and not self._waiting:
                    self._wake.wait()
                if self._stop:
                    break
                self._admit()
            self._tick()
        for job in self._running + list(self._waiting):
            job.on_end(LladaOnnxError("the server is shutting down"))

    def _admit(self) -> None:
        rows = sum(j.rows for j in self._running)
        while self._waiting and (not self._running or rows + self._waiting[0].rows <= self.max_batch):
            job = self._waiting.popleft()
            self._running.append(job)
            rows += job.rows

    def _tick(self) -> None:
        ready, shared = [], []
        for job in self._running:
            if job.cancelled.is_set():
                self._finish(job, None)
                continue
            try:
                request = job.run.next_call()
            except Exception as e:  # a request's own failure ends that request only
                self._finish(job, e)
                continue
            if request is None:
                self._finish(job, None)
            else:
                (ready if job.call is not None else shared).append((job, request))
        for logits in (False, True):  # requests that sample need the logits; the others must not pay their copy
            group = [(job, r) for job, r in shared if r.options["logits"] is logits]
            if group:
                self._shared_forward(group)
        for job, request in ready:
            self._answer(job, lambda: job.call(*request.inputs, **request.options))
        self._running = [j for j in self._running if not j.ended]

    def _shared_forward(self, batch: list) -> None:
        """One forward call for every exact-sampler step of this tick (see the module docstring)."""
        length = max(r.inputs[0].shape[1] for _, r in batch)
        count = max(r.inputs[2].shape[1] for _, r in batch)
        pad = self.pipeline.manifest.id("pad_token_id")
        ids, masks, positions = [], [], []
        for _, r in batch:
            canvas, mask, pos = r.inputs
            extra = length - canvas.shape[1]
            ids.append(np.pad(canvas, ((0, 0), (0, extra)), constant_values=pad))
            masks.append(np.pad(mask, ((0, 0), (0, extra)), constant_values=0))
            positions.append(np.pad(pos, ((0, 0), (0, count - pos.shape[1])), mode="edge"))
        logits = batch[0][1].options["logits"]
        start = time.perf_counter()
        try:
            out = self.pipeline.graph.run(np.concatenate(ids), np.concatenate(masks), np.concatenate(positions),
                                          logits=logits)
        except Exception as e:
            for job, _ in batch:
                self._finish(job, e)
            return
        seconds = time.perf_counter() - start
        self.steps += 1
        row = 0
        for job, r in batch:
            rows, cols = slice(row, row + job.rows), r.inputs[2].shape[1]
            row += job.rows
            part = StepOutput(out.top_ids[rows, :cols], out.top_prob[rows, :cols],
                              None if out.logits is None else out.logits[rows, :cols])
            self._answer(job, lambda part=part: part, seconds)

    def _answer(self, job: Job, call, seconds: float | None = None) -> None:
        try:
            out = call()
            if seconds is None:
                self.steps += 1
                seconds = job.call.seconds
            info = job.run.take(out, seconds)
            if job.on_step(info) is False:
                self._finish(job, None)
        except Exception as e:
            self._finish(job, e)

    def _finish(self, job: Job, error: BaseException | None) -> None:
        if job.ended:
            return
        job.ended = True
        job.on_end(error)
