"""``llada-onnx`` command line: ``export`` (needs the export extra), ``generate`` and ``chat`` (runtime only).

Bad input is reported as one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

EXIT_USAGE = 2


class _Fail(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (_Fail, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"llada-onnx {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


# ------------------------------------------------------------------------------------------------ parsers
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llada-onnx", description="Run LLaDA diffusion language models on ONNX Runtime.")
    sub = p.add_subparsers(dest="command")

    e = sub.add_parser("export", help="export a LLaDA checkpoint directory to ONNX (needs llada-onnx[export])")
    e.add_argument("checkpoint_dir")
    e.add_argument("output_dir")
    e.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                   help="fp32 for the CPU; fp16 for CUDA/DirectML (default fp32)")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20, the highest DirectML runs)")
    e.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to load and validate")
    e.add_argument("--fusion", choices=("none", "ort"), default="none",
                   help="ort: attention and RMSNorm as onnxruntime contrib ops, faster on the CPU and CUDA "
                        "providers; none: standard ONNX ops only, for every provider incl. DirectML (default)")
    e.add_argument("--cache", action="store_true",
                   help="also export cache.onnx, the block-wise KV-cache graph for --cache prefix/dual decoding "
                        "(shares the weights: no second copy on disk)")
    _quantization_args(e, required=False)
    e.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    e.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip the onnxruntime-vs-torch validation")
    e.set_defaults(run=_export)

    q = sub.add_parser("quantize", help="quantize an existing float export (needs llada-onnx[export]; no checkpoint)")
    q.add_argument("export_dir")
    q.add_argument("output_dir")
    _quantization_args(q, required=True)
    q.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where to validate against the float export (fp16 exports: cuda)")
    q.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    q.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip the comparison with the float export")
    q.set_defaults(run=_quantize)

    g = sub.add_parser("generate", help="generate text from prompts")
    _model_args(g)
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    g.add_argument("--file", help="a text file with one prompt per line")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="format prompts with the model's chat template (default when it has one)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="use prompts as they are")
    _sampler_args(g)
    g.add_argument("--json", action="store_true", help="print machine-readable output")
    g.add_argument("--show-steps", action="store_true", help="draw the canvas filling in")
    g.set_defaults(run=_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat")
    _model_args(c)
    _sampler_args(c)
    c.set_defaults(run=_chat)
    return p


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="an export directory written by `llada-onnx export` "
                                    "(default: the embedded Shakespeare model)")
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "dml"), help="execution provider")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: onnxruntime's choice)")


def _sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gen-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="total steps over all blocks (default: gen length)")
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--cfg-scale", type=float, default=0.0)
    p.add_argument("--remasking", choices=("low_confidence", "random"), default="low_confidence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logits-eos-inf", action="store_true", help="never sample EOS")
    p.add_argument("--confidence-eos-eot-inf", action="store_true",
                   help="upstream's EOS/EoT confidence option, exactly as shipped")
    p.add_argument("--confidence-eos-eot-inf-fixed", action="store_true",
                   help="the intended behaviour: EOS and EoT get confidence 0 at every temperature")
    fast = p.add_mutually_exclusive_group()
    fast.add_argument("--threshold", type=float, default=None,
                      help="fast decoding: commit every masked token of the block with confidence >= T each step "
                           "(at least one); blocks run until filled, --steps is not used (Fast-dLLM: 0.9)")
    fast.add_argument("--factor", type=float, default=None,
                      help="fast decoding: Fast-dLLM's factor rule, commit the n most confident tokens with "
                           "(n + 1) * (1 - c_n) < F (at least one)")
    p.add_argument("--cache", choices=("none", "prefix", "dual"), default="none",
                   help="fast decoding: run a block's steps against keys/values cached at its first step "
                        "(needs an export made with --cache); approximate")
    p.add_argument("--refresh-every", type=int, default=None, help="with --cache, refresh it every N steps too")
    p.add_argument("--no-early-stop", dest="early_stop", action="store_false",
                   help="generate every block even after each answer has ended (the text is the same)")


def _quantization_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--quantize", choices=("int8", "int4") if required else ("none", "int8", "int4"),
                   required=required, default=None if required else "none",
                   help="int8: dynamic int8 linear layers (fp32 CPU graphs); int4: weight-only MatMulNBits "
                        "(fp32 graphs for the CPU, fp16 graphs for CUDA)" + ("" if required else "; default none"))
    p.add_argument("--block-size", type=int, default=32, help="int4 block size (default 32; 128: smaller file)")
    p.add_argument("--accuracy-level", type=int, default=0,
                   help="int4 kernels' compute type: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8")
    p.add_argument("--keep-head", action="store_true",
                   help="leave the LM head and the embedding table in float when quantizing")


def _quantization(args):
    from .export.quantize import Quantization

    return Quantization(args.quantize, args.block_size, args.accuracy_level, args.keep_head)


def _settings(args) -> dict:
    return {
        "gen_length": args.gen_length, "steps": args.steps or args.gen_length,
        "block_length": min(args.block_length, args.gen_length), "temperature": args.temperature,
        "cfg_scale": args.cfg_scale, "remasking": args.remasking, "seed": args.seed,
        "logits_eos_inf": args.logits_eos_inf, "confidence_eos_eot_inf": args.confidence_eos_eot_inf,
        "confidence_eos_eot_inf_fixed": args.confidence_eos_eot_inf_fixed,
        "threshold": args.threshold, "factor": args.factor, "early_stop": args.early_stop,
        "cache": args.cache, "refresh_every": args.refresh_every,
    }


def _pipeline(args):
    from .runtime import Pipeline

    return Pipeline.from_pretrained(args.model, provider=args.provider, threads=args.threads)


# ------------------------------------------------------------------------------------------------ commands
def _export(args) -> int:
    try:
        from .export import DEFAULT_OPSET, export
    except ImportError as e:
        raise _Fail(f"export needs the export extra (pip install 'llada-onnx[export]'): {e}") from None
    export(args.checkpoint_dir, args.output_dir, dtype=args.dtype,
           opset=DEFAULT_OPSET if args.opset is None else args.opset, device=args.device,
           force=args.force, validate=args.validate, fusion=args.fusion, cache=args.cache,
           quantization=_quantization(args))
    return 0


def _quantize(args) -> int:
    try:
        from .export.quantize import quantize_export
    except ImportError as e:
        raise _Fail(f"quantize needs the export extra (pip install 'llada-onnx[export]'): {e}") from None
    quantize_export(args.export_dir, args.output_dir, _quantization(args), device=args.device, force=args.force,
                    validate=args.validate)
    return 0


def _generate(args) -> int:
    from .runtime.text import read_prompt_file

    prompts = list(args.prompt) + (read_prompt_file(args.file) if args.file else [])
    if not prompts:
        raise _Fail("no prompt given: use --prompt TEXT (repeatable) or --file PROMPTS.txt")
    settings = _settings(args)
    pipe = _pipeline(args)
    chat = pipe.codec.has_chat_template if args.chat is None else args.chat
    ids, mask = pipe.codec.encode_batch(prompts, chat)
    display = _StepDisplay(pipe.codec, ids.shape, settings, show_steps=args.show_steps,
                           enabled=sys.stderr.isatty() or args.show_steps)
    start = time.perf_counter()
    out = pipe.generate_ids(ids, mask, callback=display, **settings)
    seconds = time.perf_counter() - start
    display.close()
    texts = pipe.codec.decode_batch(out[:, ids.shape[1]:])
    if args.json:
        tokens = out.shape[0] * settings["gen_length"]
        print(json.dumps({
            "model": str(pipe.manifest.directory), "provider": pipe.provider, "chat": chat,
            "settings": settings,
            "results": [{"prompt": p, "text": t, "prompt_ids": row[m.astype(bool)].tolist(),
                         "output_ids": o[ids.shape[1]:].tolist()}
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

    pipe = _pipeline(args)
    session = ChatSession(pipe, **_settings(args))
    print("llada-onnx chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            return 0
        if not line.strip():
            return 0
        print(f"llada> {session.send(line)}")


class _StepDisplay:
    """Progress on stderr (steps done / total, tokens/s) and, with ``show_steps``, the canvas filling in."""

    def __init__(self, codec, prompt_shape, settings, *, show_steps: bool, enabled: bool):
        self.codec, self.show_steps, self.enabled = codec, show_steps, enabled
        self.prompt_len = prompt_shape[1]
        self.tokens = prompt_shape[0] * settings["gen_length"]
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
        steps = f"{info.step + 1}/{info.total_steps}" if info.total_steps else f"{info.step + 1}"
        line = f"\rstep {steps} [{bar:<30}] {rate:.1f} tok/s"
        if self.show_steps:
            row = info.canvas[0, self.prompt_len:]
            shown = " ".join("_" if t == self.mask_id else (self.codec.tokenizer.id_to_token(int(t)) or "?")
                             for t in row)
            line = f"{line}\n  {shown}"
            print(line, file=sys.stderr, flush=True)
        else:
            print(line, end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and not self.show_steps:
            print(file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
