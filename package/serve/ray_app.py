"""Scale-out on Ray Serve: the same FastAPI application, one onnxruntime session per replica.

Each replica builds its own :class:`~llada_onnx.runtime.Pipeline` and its own continuous-batching scheduler; Ray
Serve's HTTP proxy spreads requests over the replicas (streaming responses pass through), and autoscaling bounds
or a fixed replica count say how many run. Needs the ``ray`` extra.

- ``llada-onnx serve --ray --replicas N`` starts a local Ray cluster (or joins ``$RAY_ADDRESS``) and runs it;
- ``serve run llada_onnx.serve.ray_app:build model=DIR replicas=4 num_gpus=1`` is the same through Ray's own CLI,
  which is how it runs on a multi-machine cluster (``ray start --head`` on one machine, ``ray start
  --address=HEAD:6379`` on the others, then ``serve run`` against it).
"""

from __future__ import annotations

from typing import Any

from ray import serve

from ..runtime.pipeline import Pipeline
from .app import create_app


@serve.ingress()
class LladaOnnxReplica:
    """One replica: the export opened once, then the server's application over it."""

    def __init__(self, model: str | None, provider: str, threads: int | None, server: dict[str, Any]):
        self.pipeline = Pipeline.from_pretrained(model, provider=provider, threads=threads)
        self.server = server

    def __serve_build_asgi_app__(self):
        return create_app(self.pipeline, **self.server)


def application(model: str | None = None, *, provider: str = "cpu", threads: int | None = None,
                replicas: int | None = 1, min_replicas: int | None = None, max_replicas: int | None = None,
                num_cpus: float = 1, num_gpus: float = 0, **server: Any):
    """The bound Ray Serve application. ``replicas`` fixes the count; or ``min_replicas``/``max_replicas`` let
    Ray Serve autoscale between them on ongoing requests. ``server``: :func:`~.app.create_app`'s options
    (``model_name``, ``defaults``, ``seed``, ``api_key``, ``max_batch``, ``max_queue``)."""
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus}}
    if min_replicas is not None or max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": min_replicas or 1, "max_replicas": max_replicas or 1,
                                         "target_ongoing_requests": server.get("max_batch", 16)}
    else:
        options["num_replicas"] = replicas
    server.setdefault("model_name", model.rstrip("/").rsplit("/", 1)[-1] if model else "llada-onnx-default")
    deployment = serve.deployment(LladaOnnxReplica, name="llada-onnx", **options)
    return deployment.bind(model, provider, threads, server)


def build(args: dict[str, str]):
    """For ``serve run llada_onnx.serve.ray_app:build key=value ...``: model, provider, threads, replicas,
    min_replicas, max_replicas, num_cpus, num_gpus, max_batch, max_queue, api_key."""
    known = {"model": str, "provider": str, "threads": int, "replicas": int, "min_replicas": int,
             "max_replicas": int, "num_cpus": float, "num_gpus": float, "max_batch": int, "max_queue": int,
             "api_key": str}
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; use {', '.join(known)}")
    values = {k: known[k](v) for k, v in args.items()}
    return application(values.pop("model", None), **values)
