"""``llada-onnx`` command line: ``export``, ``quantize`` and ``verify`` (need the export extra), ``generate``,
``chat`` and ``serve`` (needs the serve extra).

A mistake in the user's input (any :class:`~llada_onnx.runtime.errors.LladaOnnxError`) is one line on stderr
naming the flag or file, with exit code 2; anything else is a bug in llada-onnx and keeps its traceback (exit 1).
The sampler flags are generated from :class:`~llada_onnx.runtime.settings.SamplerSettings`, so their defaults
and checks are the Python API's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import Sequence

from . import __version__
from .runtime.errors import InputError, LladaOnnxError
from .runtime.settings import knobs

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a reader that went away


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        code = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return EXIT_BROKEN_PIPE
    except LladaOnnxError as e:
        print(f"llada-onnx {args.command}: error: {e.render(_flag_names())}", file=sys.stderr)
        return EXIT_USAGE


def _flag_names() -> dict[str, str]:
    """How error messages' quoted names read on the command line."""
    names = {f.name: _flag(f) for f in knobs()}
    names.update({"chat=False": "--raw", "chat=True": "--chat", "threads": "--threads", "seed": "--seed"})
    names.update({name: "--" + name.replace("_", "-") for name in BLOCK_ONLY})
    return names


def _flag(field) -> str:
    negated = field.metadata.get("text_default") is True
    return ("--no-" if negated else "--") + field.name.replace("_", "-")


# ------------------------------------------------------------------------------------------------ parsers
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except switches and options whose help says what unset means."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llada-onnx", description="Run LLaDA diffusion language models on ONNX Runtime.",
                                formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"llada-onnx {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show the libraries' log messages (INFO and up)")
    sub = p.add_subparsers(dest="command")

    def command(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description or help, parents=[common],
                              formatter_class=_HelpFormatter)

    e = command("export", "export a LLaDA checkpoint directory to ONNX (needs llada-onnx[export])")
    e.add_argument("checkpoint_dir", help="a Hugging Face checkpoint directory (config.json, safetensors weights)")
    e.add_argument("output_dir", help="a new or empty directory, or an earlier export (with --force)")
    e.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                   help="fp32 for the CPU; fp16 for CUDA/DirectML")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the highest DirectML runs)")
    e.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to load and validate")
    e.add_argument("--fusion", choices=("none", "ort"), default="none",
                   help="ort: attention and RMSNorm as onnxruntime contrib ops, faster on the CPU and CUDA "
                        "providers; none: standard ONNX ops only, for every provider incl. DirectML")
    e.add_argument("--cache", action="store_true",
                   help="also export cache.onnx, the block-wise KV-cache graph for --cache prefix/dual decoding "
                        "(shares the weights: no second copy on disk)")
    e.add_argument("--moe", choices=("fused", "decomposed"), default="fused",
                   help="mixture-of-experts models: experts as onnxruntime's fused MoE kernel (CPU, CUDA) or in "
                        "standard ONNX ops (any provider, DirectML too; every expert runs on every token)")
    _quantization_args(e, required=False)
    e.add_argument("--scratch", help="with --quantize: a folder for the float graph that is quantized (e.g. another "
                                     "disk, or /dev/shm), removed afterwards (default: beside the output)")
    e.add_argument("--force", action="store_true", help="replace an earlier export in the output directory")
    e.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip the onnxruntime-vs-torch validation")
    e.set_defaults(run=_export)

    q = command("quantize", "quantize an existing float export (needs llada-onnx[export]; no checkpoint)")
    q.add_argument("export_dir", help="a float export made by llada-onnx export")
    q.add_argument("output_dir", help="a new or empty directory, or an earlier export (with --force)")
    _quantization_args(q, required=True)
    q.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where to validate against the float export (fp16 exports: cuda)")
    q.add_argument("--force", action="store_true", help="replace an earlier export in the output directory")
    q.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip the comparison with the float export")
    q.set_defaults(run=_quantize)

    v = command("verify", "check an export against its checkpoint: logits and the sampler, torch vs the runtime "
                          "(needs llada-onnx[export])")
    v.add_argument("checkpoint_dir", help="the Hugging Face checkpoint the export was made from")
    v.add_argument("export_dir", help="the export to check")
    v.add_argument("--prompts", help="a UTF-8 file with one prompt per line (default: three built-in prompts)")
    v.add_argument("--grid", choices=("quick", "full"), default="quick",
                   help="sampler settings to compare: quick (4) or full (the test suite's grid: blocks, steps, CFG, "
                        "EOS options, random remasking, temperature)")
    v.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "dml"), help="the export's execution provider")
    v.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where torch runs")
    v.add_argument("--torch-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="torch's precision: bf16 halves its memory (large models on a GPU), and then every export is "
                        "judged as approximate")
    v.add_argument("--threads", type=int, default=None, help="CPU threads (default: onnxruntime's choice)")
    v.add_argument("--json", action="store_true", help="print the whole report as JSON instead of the table")
    v.set_defaults(run=_verify)

    g = command("generate", "generate text from prompts")
    _model_args(g, "an export directory written by `llada-onnx export` (default: the embedded Shakespeare model)")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    g.add_argument("--file", help="a UTF-8 text file with one prompt per line")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="format prompts with the model's chat template (default when it has one)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="use prompts as they are")
    _sampler_args(g)
    g.add_argument("--json", action="store_true", help="print prompts, texts, token ids, settings and timings")
    g.add_argument("--show-steps", action="store_true", help="draw the canvas filling in (_ = still masked)")
    g.set_defaults(run=_generate)

    c = command("chat", "interactive multi-turn chat with an Instruct export",
                "Interactive multi-turn chat. Needs an export of an Instruct model (one with a chat template): "
                "the embedded default model is a base model, so use `llada-onnx generate` for it.")
    _model_args(c, "an export of an Instruct model (required: the embedded default model has no chat template)")
    _sampler_args(c)
    c.set_defaults(run=_chat)

    s = command("serve", "an OpenAI-compatible HTTP server with a web page (needs llada-onnx[serve])",
                "An OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, /health) "
                "and a web page at / that draws the canvas denoising. Concurrent requests share model calls "
                "(step-level continuous batching). The sampler flags set the defaults that requests may override.")
    _model_args(s, "an export directory (default: the embedded Shakespeare model)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="TCP port")
    s.add_argument("--max-batch", type=int, default=16, help="rows per model call (a CFG request counts two)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch; more get HTTP 429")
    s.add_argument("--api-key", default=os.environ.get("LLADA_ONNX_API_KEY"),
                   help="require Authorization: Bearer KEY on /v1/ (default: $LLADA_ONNX_API_KEY; none: open)")
    s.add_argument("--ray", action="store_true",
                   help="run on Ray Serve (needs llada-onnx[ray]): a local Ray cluster, or $RAY_ADDRESS")
    s.add_argument("--replicas", type=int, default=1, help="with --ray: replicas, one onnxruntime session each")
    s.add_argument("--num-cpus", type=float, default=1, help="with --ray: CPUs reserved per replica")
    s.add_argument("--num-gpus", type=float, default=0, help="with --ray: GPUs reserved per replica")
    _sampler_args(s)
    s.set_defaults(run=_serve)
    return p


def _model_args(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("--model", help=model_help)
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "dml"), help="execution provider")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: onnxruntime's choice)")


def _sampler_args(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`SamplerSettings` field, with its default for text output."""
    for field in knobs():
        kind, default = field.metadata["kind"], field.metadata.get("text_default", field.default)
        if kind is bool:
            p.add_argument(_flag(field), dest=field.name, action="store_false" if default else "store_true",
                           default=default, help=field.metadata["help"])
        else:
            p.add_argument(_flag(field), dest=field.name, type=kind, default=default,
                           choices=field.metadata["choices"], help=field.metadata["help"])
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling and remasking noise")
    block = p.add_argument_group("block diffusion (LLaDA2 exports; --steps is then per block, --threshold commits "
                                 "what exceeds it, default 0.95)")
    block.add_argument("--minimal-topk", type=int, help="cap the steps per block at gen length / N (default 1)")
    block.add_argument("--eos-early-stop", action="store_true",
                       help="stop as soon as an EOS is committed with no mask before it")
    block.add_argument("--top-k", type=int, help="sample among the k most likely tokens (temperature > 0)")
    block.add_argument("--top-p", type=float, help="nucleus sampling (temperature > 0)")
    block.add_argument("--editing-threshold", type=float,
                       help="LLaDA2.1 token editing: replace a committed token predicted otherwise above this")
    block.add_argument("--max-post-steps", type=int, help="LLaDA2.1: editing steps after a block is filled")


def _quantization_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--quantize", choices=("int8", "int4") if required else ("none", "int8", "int4"),
                   required=required, default=None if required else "none",
                   help="int8: dynamic int8 linear layers (fp32 CPU graphs); int4: weight-only MatMulNBits "
                        "(fp32 graphs for the CPU, fp16 graphs for CUDA)")
    p.add_argument("--block-size", type=int, default=32, help="int4 block size (128: a smaller file)")
    p.add_argument("--accuracy-level", type=int, default=0,
                   help="int4 kernels' compute type: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8")
    p.add_argument("--keep-head", action="store_true",
                   help="leave the LM head and the embedding table in float when quantizing")


def _quantization(args):
    from .export.quantize import Quantization

    return Quantization(args.quantize, args.block_size, args.accuracy_level, args.keep_head)


BLOCK_ONLY = ("minimal_topk", "eos_early_stop", "top_k", "top_p", "editing_threshold", "max_post_steps")
SHARED = ("gen_length", "block_length", "steps", "threshold", "temperature")  # flags both samplers take


def _settings(args, block_diffusion: bool = False):
    """The sampler settings the flags ask for, checked as the export's sampler family takes them (LLaDA's, or
    LLaDA2's block diffusion): a flag of the other family, set, is an error naming it."""
    from .runtime.block_settings import BlockSettings
    from .runtime.settings import SamplerSettings

    return (BlockSettings if block_diffusion else SamplerSettings).of(_setting_flags(args, block_diffusion))


def _setting_flags(args, block_diffusion: bool) -> dict:
    """The flags' values by setting name, unresolved (``None``: the setting follows the others or its default)."""
    given = lambda name: getattr(args, name) not in (None, False)  # noqa: E731
    if not block_diffusion:
        other = [n for n in BLOCK_ONLY if given(n)]
        if other:
            raise InputError(f"`{other[0]}` is a block-diffusion (LLaDA2) setting; this export runs LLaDA's sampler")
        return {field.name: getattr(args, field.name) for field in knobs()}
    defaults = {f.name: f.metadata.get("text_default", f.default) for f in knobs()}
    other = [f.name for f in knobs() if f.name not in SHARED and getattr(args, f.name) != defaults[f.name]]
    if other[:1] == ["cache"]:
        raise InputError("`cache` prefix/dual are LLaDA's approximate caches; this export (LLaDA2) always decodes "
                         "with its exact block cache (Python API: cache=\"none\" turns it off)")
    if other:
        raise InputError(f"`{other[0]}` is not a setting of the block-diffusion sampler this export (LLaDA2) runs")
    values = {name: getattr(args, name) for name in SHARED + BLOCK_ONLY}
    values["eos_early_stop"] = args.eos_early_stop or None  # a switch left off: the setting's default
    return values


def _pipeline(args):
    from .runtime import Pipeline

    return Pipeline.from_pretrained(args.model, provider=args.provider, threads=args.threads)


def _export_extra(what: str):
    try:
        from . import export
    except ImportError as e:
        raise InputError(f"{what} needs the export extra (pip install '.[export]' in a clone): {e}") from None
    return export


# ------------------------------------------------------------------------------------------------ commands
def _export(args) -> int:
    export = _export_extra("export")
    export.export(args.checkpoint_dir, args.output_dir, dtype=args.dtype, opset=args.opset, device=args.device,
                  force=args.force, validate=args.validate, fusion=args.fusion, cache=args.cache,
                  quantization=_quantization(args), moe=args.moe, scratch=args.scratch)
    return 0


def _quantize(args) -> int:
    _export_extra("quantize")
    from .export.quantize import quantize_export

    quantize_export(args.export_dir, args.output_dir, _quantization(args), device=args.device, force=args.force,
                    validate=args.validate)
    return 0


def _verify(args) -> int:
    _export_extra("verify")
    from .export.verify import table, verify
    from .runtime.text import read_prompt_file

    prompts = read_prompt_file(args.prompts) if args.prompts else None
    report = verify(args.checkpoint_dir, args.export_dir, prompts=prompts, grid=args.grid, provider=args.provider,
                    device=args.device, torch_dtype=args.torch_dtype, threads=args.threads,
                    say=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2) if args.json else table(report))
    if not report["passed"]:
        print(f"llada-onnx verify: failed: {report['first_failure']}", file=sys.stderr)
        return 1
    return 0


def _generate(args) -> int:
    from .runtime.text import read_prompt_file

    prompts = list(args.prompt) + (read_prompt_file(args.file) if args.file else [])
    if not prompts:
        raise InputError("no prompt given: use --prompt TEXT (repeatable) or --file PROMPTS.txt")
    pipe = _pipeline(args)
    settings = _settings(args, pipe.block_diffusion)
    chat = pipe.codec.has_chat_template if args.chat is None else args.chat
    ids, mask = pipe.codec.encode_batch(prompts, chat)
    display = _StepDisplay(pipe.codec, ids.shape, settings.gen_length, show_steps=args.show_steps,
                           enabled=sys.stderr.isatty() or args.show_steps)
    start = time.perf_counter()
    out = pipe.generate_ids(ids, mask, seed=args.seed, callback=display, **settings.as_dict())
    seconds = time.perf_counter() - start
    display.close()
    texts = pipe.codec.decode_batch(out[:, ids.shape[1]:ids.shape[1] + settings.gen_length])
    if args.json:
        tokens = out.shape[0] * settings.gen_length
        print(json.dumps({
            "model": str(pipe.manifest.directory), "provider": pipe.provider, "chat": chat,
            "settings": dict(settings.as_dict(), seed=args.seed),
            "results": [{"prompt": p, "text": t, "prompt_ids": row[m.astype(bool)].tolist(),
                         "output_ids": o[ids.shape[1]:ids.shape[1] + settings.gen_length].tolist()}
                        for p, t, row, m, o in zip(prompts, texts, ids, mask, out)],
            "timings": {"seconds": seconds, "steps": display.steps_run, "tokens_per_second": tokens / seconds},
        }, indent=2))
    else:
        for i, text in enumerate(texts):
            if len(texts) > 1:
                print(f"--- [{i}] {prompts[i]}")
            print(text)
    return 0


def _chat(args) -> int:
    from .runtime.chat import ChatSession

    if args.model is None:
        raise InputError("chat needs --model DIR, an export of an Instruct model: the embedded default model is a "
                         "base model without a chat template (use `llada-onnx generate --prompt TEXT` for it)")
    pipe = _pipeline(args)
    session = ChatSession(pipe, seed=args.seed, **_settings(args, pipe.block_diffusion).as_dict())
    print("llada-onnx chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            return 0
        if not line.strip():
            return 0
        try:
            answer = session.send(line)
        except InputError as e:  # this message cannot be answered; the conversation goes on
            print(f"llada-onnx chat: error: {e.render(_flag_names())}", file=sys.stderr)
            continue
        if session.dropped_turns:
            print(f"(the conversation outgrew the model's context: dropped the oldest {session.dropped_turns} "
                  "turn(s))", file=sys.stderr)
        print(f"llada> {answer}")


def _serve(args) -> int:
    try:
        import uvicorn

        from .serve import create_app
    except ImportError as e:
        raise InputError(f"serve needs the serve extra (pip install '.[serve]' in a clone): {e}") from None
    for name in ("max_batch", "max_queue", "port"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    from .runtime.manifest import Manifest

    # a wrong directory is the user's error here, not a replica's crash later
    block_diffusion = bool(args.model) and Manifest.load(args.model).block_diffusion
    _settings(args, block_diffusion)  # the defaults must make a valid request themselves
    # unresolved, so that a request's max_tokens also moves the steps and block length that follow it
    defaults = _setting_flags(args, block_diffusion)
    server = dict(defaults=defaults, seed=args.seed, api_key=args.api_key, max_batch=args.max_batch,
                  max_queue=args.max_queue)
    if args.ray:
        return _serve_on_ray(args, server)
    pipe = _pipeline(args)
    name = pipe.manifest.directory.name if args.model else "llada-onnx-default"
    app = create_app(pipe, model_name=name, **server)
    print(f"llada-onnx serve: {name} on http://{args.host}:{args.port}/ (Ctrl-C to stop)", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _serve_on_ray(args, server: dict) -> int:
    try:
        import ray
        from ray import serve

        from .serve.ray_app import application
    except ImportError as e:
        raise InputError(f"serve --ray needs the ray extra (pip install '.[ray]' in a clone): {e}") from None
    if args.replicas < 1:
        raise InputError(f"--replicas must be a positive integer, got {args.replicas}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that the finally below stops what ray.init started
    ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING, log_to_driver=args.verbose)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application(args.model, provider=args.provider, threads=args.threads, replicas=args.replicas,
                          num_cpus=args.num_cpus, num_gpus=args.num_gpus, **server),
              name="llada-onnx", route_prefix="/")
    print(f"llada-onnx serve: {args.replicas} replica(s) on Ray Serve at http://{args.host}:{args.port}/ "
          "(Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()


class _StepDisplay:
    """Progress on stderr (steps done / total, tokens/s) and, with ``show_steps``, the canvas filling in."""

    def __init__(self, codec, prompt_shape, gen_length: int, *, show_steps: bool, enabled: bool):
        self.codec, self.show_steps, self.enabled = codec, show_steps, enabled
        self.prompt_len = prompt_shape[1]
        self.tokens = prompt_shape[0] * gen_length
        self.start = time.perf_counter()
        self.mask_id = codec.manifest.id("mask_token_id")
        self.steps_run = 0

    def __call__(self, info) -> None:
        self.steps_run += 1
        if not self.enabled:
            return
        # Progress is counted in committed tokens: under threshold/factor decoding the step count is not known.
        done = int((info.canvas[:, self.prompt_len:] != self.mask_id).sum())
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        bar = "#" * (30 * done // self.tokens)
        total = getattr(info, "total_steps", None)  # None under threshold/factor rules and block diffusion
        steps = f"{info.step + 1}/{total}" if total else f"{info.step + 1}"
        line = f"\rstep {steps} [{bar:<30}] {rate:.1f} tok/s"
        if self.show_steps:
            shown = self.codec.render_canvas(info.canvas[0, self.prompt_len:]).replace("\n", "\\n")
            print(f"{line}\n  {shown}", file=sys.stderr, flush=True)
        else:
            print(line, end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and not self.show_steps:
            print(file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
