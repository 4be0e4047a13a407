"""A ``llada-onnx serve`` process on a free localhost port: for tests and benchmarks of code that talks HTTP to
the server (this project's own, and a user's equivalence tests against ``Pipeline.generate``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


class LocalServer:
    """Starts the server with ``args`` (``--model``, ``--max-batch``, sampler defaults, ...) and waits for
    ``/health``; ``api_key`` sets ``$LLADA_ONNX_API_KEY`` for it. Use as a context manager, or call :meth:`stop`."""

    def __init__(self, *args: str, api_key: str | None = None, timeout: float = 120):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, LLADA_ONNX_API_KEY=api_key or "")
        self.proc = subprocess.Popen([sys.executable, "-m", "llada_onnx", "serve", "--port", str(self.port), *args],
                                     env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + timeout
        while True:
            try:
                self.health()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"llada-onnx serve exited: {self.proc.stdout.read()}") from None
                if time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"llada-onnx serve did not answer within {timeout} s") from None
                time.sleep(0.2)

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
            return json.loads(r.read())

    def post(self, path: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
        """``(status, decoded JSON body)`` of a POST, 4xx/5xx included."""
        request = urllib.request.Request(self.url + path, data=data, headers=headers or {}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def rss_mb(self) -> float:
        """The server process's resident memory (Linux)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS for the server process")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
