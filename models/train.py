"""Pre-train a small LLaDA from scratch: the recipe of the embedded default model.

    python -m llada_onnx.models.corpus TEXTS_DIR DATA_DIR          # tokenizer + token arrays (see corpus.py)
    python -m llada_onnx.models.train DATA_DIR RUN_DIR --minutes 7  # on a GPU; resumable with --resume

The objective is LLaDA's (the guidelines' ``forward_process``): per sequence ``t ~ U(eps, 1)``, every token is
replaced by the mask id with probability ``t``, and the loss is the cross-entropy on the masked tokens divided by
``t``, summed and divided by ``batch * length``; about 1% of batches are cut to a random shorter length so the model
also sees short canvases. AdamW with linear warm-up and cosine decay; bf16 autocast on CUDA.

``--minutes`` sets the training budget: the first steps are timed and the step count fixed from them, so the
cosine schedule ends on time and a resumed run keeps the same schedule. ``--stop-after SECONDS`` saves
``RUN_DIR/state.pt`` and exits early (for machines lent by the command); ``--resume`` continues from it.
At the end the model is written in the official layout, in bf16 as LLaDA's own weights are, with its tokenizer
files, to ``RUN_DIR/checkpoint``; the losses and the recipe go to ``RUN_DIR/training.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .config import LLaDAConfig
from .modeling import LLaDAModel
from .tokenizer_files import write_tokenizer_files

STATE_FILE = "state.pt"
CALIBRATION_STEPS = 30  # timed steps (after 5 warm-up steps) that fix the step count of a --minutes budget


@dataclasses.dataclass
class Recipe:
    # model shape (the embedded default model; ~4.4M parameters)
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    mlp_hidden_size: int = 384
    max_sequence_length: int = 512
    rope_theta: float = 10000.0
    weight_tying: bool = True
    # optimisation
    seq_len: int = 512
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eps: float = 1e-3  # the smallest masking ratio (guidelines)
    random_length_prob: float = 0.01
    seed: int = 0


def model_config(recipe: Recipe, vocab_size: int, ids: dict[str, int]) -> LLaDAConfig:
    return LLaDAConfig(
        d_model=recipe.d_model, n_heads=recipe.n_heads, n_layers=recipe.n_layers,
        mlp_hidden_size=recipe.mlp_hidden_size, vocab_size=vocab_size, embedding_size=vocab_size,
        n_kv_heads=recipe.n_heads, max_sequence_length=recipe.max_sequence_length, rope_theta=recipe.rope_theta,
        weight_tying=recipe.weight_tying, **ids)


def init_weights(model: LLaDAModel, seed: int) -> None:
    """Normal(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 n_layers), norms at one."""
    gen = torch.Generator().manual_seed(seed)
    out_std = 0.02 / math.sqrt(2 * model.config.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.fill_(1.0)
            elif ".blocks." in name and (name.endswith("attn_out.weight") or name.endswith("ff_out.weight")):
                p.copy_(torch.randn(p.shape, generator=gen) * out_std)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def forward_process(ids: torch.Tensor, mask_id: int, eps: float, gen: torch.Generator):
    """The guidelines' noising: ``(noisy ids, masked positions, per-token masking probability)``."""
    b, length = ids.shape
    t = torch.rand(b, device=ids.device, generator=gen)
    p_mask = ((1 - eps) * t + eps)[:, None].expand(b, length)
    masked = torch.rand((b, length), device=ids.device, generator=gen) < p_mask
    return torch.where(masked, mask_id, ids), masked, p_mask


def diffusion_loss(model: LLaDAModel, ids: torch.Tensor, noisy: torch.Tensor, masked: torch.Tensor,
                   p_mask: torch.Tensor) -> torch.Tensor:
    logits = model(noisy)
    token_loss = F.cross_entropy(logits[masked].float(), ids[masked], reduction="none") / p_mask[masked]
    return token_loss.sum() / ids.numel()


@torch.no_grad()
def masked_token_loss(model: LLaDAModel | Callable[[np.ndarray], np.ndarray], tokens: np.ndarray, seq_len: int,
                      mask_id: int, *, eps: float = 1e-3, max_sequences: int = 256, batch_size: int = 32,
                      seed: int = 1234) -> dict[str, float]:
    """Deterministic evaluation on consecutive ``seq_len`` chunks of a token stream, in float32.

    The masking ratios and masks come from NumPy with a fixed seed, so every model (and every engine) is scored on
    the same corruptions. ``model`` is the torch model, or any function from noisy ids (int64 ``[batch, seq_len]``)
    to logits (an onnxruntime session: the quantization benchmark scores exports with it). Returns
    ``masked_token_loss`` (mean cross-entropy per masked token, nats) and ``elbo`` (the training objective,
    comparable to the logged train loss).
    """
    if isinstance(model, torch.nn.Module):
        device = next(model.parameters()).device
        logits_of = lambda ids: model(torch.from_numpy(ids).to(device)).float()  # noqa: E731
    else:
        device = torch.device("cpu")
        logits_of = lambda ids: torch.from_numpy(np.asarray(model(ids), dtype=np.float32))  # noqa: E731
    n = min(len(tokens) // seq_len, max_sequences)
    chunks = np.asarray(tokens[: n * seq_len], dtype=np.int64).reshape(n, seq_len)
    rng = np.random.default_rng(seed)
    p = ((1 - eps) * rng.random(n) + eps)[:, None]
    masked = rng.random((n, seq_len)) < p
    ce_sum = weighted_sum = 0.0
    count = 0
    for i in range(0, n, batch_size):
        ids = torch.from_numpy(chunks[i:i + batch_size]).to(device)
        m = torch.from_numpy(masked[i:i + batch_size]).to(device)
        pm = torch.from_numpy(np.broadcast_to(p[i:i + batch_size], m.shape).copy()).to(device)
        logits = logits_of(np.where(masked[i:i + batch_size], mask_id, chunks[i:i + batch_size]))
        ce = F.cross_entropy(logits[m], ids[m], reduction="none")
        ce_sum += ce.sum().item()
        weighted_sum += (ce / pm[m].float()).sum().item()
        count += int(m.sum().item())
    return {"masked_token_loss": ce_sum / max(count, 1), "elbo": weighted_sum / (n * seq_len),
            "sequences": n, "masked_tokens": count}


def lr_at(step: int, max_steps: int, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = min(1.0, (step - recipe.warmup_steps) / max(1, max_steps - recipe.warmup_steps))
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    """Owns the model, optimiser, data and schedule; ``state()`` / ``load_state()`` make a run resumable."""

    def __init__(self, data_dir: Path, recipe: Recipe, device: torch.device):
        from tokenizers import Tokenizer

        self.data_dir, self.recipe, self.device = data_dir, recipe, device
        corpus = json.loads((data_dir / "corpus.json").read_text(encoding="utf-8"))
        self.tokenizer = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
        self.config = model_config(recipe, int(corpus["vocab_size"]), corpus["special_ids"])
        self.train_tokens = np.load(data_dir / "train.npy")
        self.heldout_tokens = np.load(data_dir / "heldout.npy")
        self.stream = torch.from_numpy(self.train_tokens.astype(np.int64)).to(device)
        torch.manual_seed(recipe.seed)
        self.model = LLaDAModel(self.config)
        init_weights(self.model, recipe.seed)
        self.model.to(device).train()
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=recipe.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
        self.gen = torch.Generator(device=device).manual_seed(recipe.seed)  # batches and masks, on the device
        self.cpu_gen = torch.Generator().manual_seed(recipe.seed)  # batch lengths, without a device sync
        self.step, self.max_steps, self.train_seconds = 0, None, 0.0
        self.log: list[dict] = []
        self.evals: list[dict] = []

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def batch(self) -> torch.Tensor:
        r = self.recipe
        starts = torch.randint(0, self.stream.numel() - r.seq_len, (r.batch_size,), device=self.device,
                               generator=self.gen)
        ids = self.stream[starts[:, None] + torch.arange(r.seq_len, device=self.device)]
        if torch.rand((), generator=self.cpu_gen).item() < r.random_length_prob:
            ids = ids[:, :int(torch.randint(1, r.seq_len + 1, (), generator=self.cpu_gen))]
        return ids

    def train_step(self) -> torch.Tensor:
        r = self.recipe
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.max_steps or 10**9, r)
        ids = self.batch()
        noisy, masked, p_mask = forward_process(ids, self.config.mask_token_id, r.eps, self.gen)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = diffusion_loss(self.model, ids, noisy, masked, p_mask)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.grad_clip)
        self.opt.step()
        self.step += 1
        return loss.detach()

    def evaluate(self, split: str = "heldout", model: LLaDAModel | None = None) -> dict[str, float]:
        model = model or self.model
        model.eval()
        tokens = self.heldout_tokens if split == "heldout" else self.train_tokens
        result = masked_token_loss(model, tokens, self.recipe.seq_len, self.config.mask_token_id, eps=self.recipe.eps)
        self.model.train()
        return result

    # ------------------------------------------------------------------ resume
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "gen": self.gen.get_state(),
                "cpu_gen": self.cpu_gen.get_state(),
                "step": self.step, "max_steps": self.max_steps, "train_seconds": self.train_seconds,
                "log": self.log, "evals": self.evals, "recipe": dataclasses.asdict(self.recipe)}

    def load_state(self, state: dict) -> None:
        if state["recipe"] != dataclasses.asdict(self.recipe):
            raise SystemExit("error: --resume with a different recipe than the saved run; use the same flags")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
        self.cpu_gen.set_state(state["cpu_gen"])
        self.step, self.max_steps = state["step"], state["max_steps"]
        self.train_seconds, self.log, self.evals = state["train_seconds"], state["log"], state["evals"]


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def write_checkpoint(trainer: Trainer, out: Path) -> LLaDAModel:
    """The trained model in the official layout, weights in bf16; returns that bf16 model (on the CPU)."""
    import copy

    model = copy.deepcopy(trainer.model).to("cpu", torch.bfloat16).eval()
    model.save_pretrained(out)
    write_tokenizer_files(out, trainer.config, trainer.tokenizer, chat_template=None)
    return model


def run(args: argparse.Namespace) -> int:
    data_dir, run_dir = Path(args.data_dir), Path(args.run_dir)
    if not (data_dir / "corpus.json").is_file():
        print(f"error: {data_dir} has no corpus.json: run `python -m llada_onnx.models.corpus` first",
              file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)
                       if getattr(args, f.name, None) is not None})
    trainer = Trainer(data_dir, recipe, device)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / STATE_FILE
    if args.resume:
        if not state_path.is_file():
            print(f"error: --resume but {state_path} does not exist", file=sys.stderr)
            return 2
        trainer.load_state(torch.load(state_path, map_location=device, weights_only=False))
        print(f"resumed at step {trainer.step}/{trainer.max_steps}", file=sys.stderr)
    elif args.max_steps:
        trainer.max_steps = args.max_steps
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{trainer.parameters:,} parameters on {device_name}; recipe {dataclasses.asdict(recipe)}", file=sys.stderr)

    process_start = time.perf_counter()  # this process's share of train_seconds (periodic evals included)
    losses: list[torch.Tensor] = []
    calib_start = None
    while trainer.max_steps is None or trainer.step < trainer.max_steps:
        losses.append(trainer.train_step())
        if trainer.max_steps is None:  # calibrating a --minutes budget
            if trainer.step == 5:
                torch.cuda.synchronize() if device.type == "cuda" else None
                calib_start = time.perf_counter()
            elif trainer.step == 5 + CALIBRATION_STEPS:
                torch.cuda.synchronize() if device.type == "cuda" else None
                per_step = (time.perf_counter() - calib_start) / CALIBRATION_STEPS
                trainer.max_steps = max(trainer.step + 1, int(args.minutes * 60 / per_step))
                print(f"{per_step * 1000:.1f} ms/step: {trainer.max_steps} steps in {args.minutes} min",
                      file=sys.stderr)
        if trainer.step % args.log_every == 0:
            loss = torch.stack(losses).mean().item()
            losses.clear()
            entry = {"step": trainer.step, "loss": loss, "lr": trainer.opt.param_groups[0]["lr"],
                     "seconds": round(time.perf_counter() - process_start, 1)}
            trainer.log.append(entry)
            print(json.dumps(entry), file=sys.stderr, flush=True)
        if args.eval_every and trainer.step % args.eval_every == 0:
            ev = dict(step=trainer.step, **trainer.evaluate())
            trainer.evals.append(ev)
            print(json.dumps({"eval": ev}), file=sys.stderr, flush=True)
        if args.stop_after and time.perf_counter() - process_start > args.stop_after:
            trainer.train_seconds += time.perf_counter() - process_start
            save_atomic(trainer.state(), state_path)
            print(f"stopped at step {trainer.step}/{trainer.max_steps}; continue with --resume", file=sys.stderr)
            return 0
    trainer.train_seconds += time.perf_counter() - process_start
    save_atomic(trainer.state(), state_path)

    ckpt = write_checkpoint(trainer, run_dir / "checkpoint")
    shipped = ckpt.to(device, torch.float32)  # the bf16 weights as shipped, evaluated in float32
    summary = {
        "parameters": trainer.parameters, "device": device_name, "steps": trainer.step,
        "tokens_seen": trainer.step * recipe.batch_size * recipe.seq_len,
        "epochs": trainer.step * recipe.batch_size * recipe.seq_len / len(trainer.train_tokens),
        "train_minutes": round(trainer.train_seconds / 60, 2),
        "final_train_loss_logged": trainer.log[-1]["loss"] if trainer.log else None,
        "train": trainer.evaluate("train", shipped), "heldout": trainer.evaluate("heldout", shipped),
        "recipe": dataclasses.asdict(recipe), "evals": trainer.evals, "log": trainer.log,
    }
    (run_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: summary[k] for k in ("parameters", "steps", "epochs", "train_minutes", "train", "heldout")}),
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llada_onnx.models.train",
                                description="Pre-train a small LLaDA with the masked diffusion objective.")
    p.add_argument("data_dir", help="written by `python -m llada_onnx.models.corpus`")
    p.add_argument("run_dir", help="state.pt, training.json and the final checkpoint/ go here")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=7.0, help="training budget (sets the step count)")
    budget.add_argument("--max-steps", type=int, help="a fixed step count instead of a time budget")
    p.add_argument("--stop-after", type=float, help="save state.pt and exit after this many seconds")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/state.pt")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=1000, help="held-out evaluation interval (0: only at the end)")
    for f in dataclasses.fields(Recipe):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
        else:
            p.add_argument(flag, type=type(f.default), default=None)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
