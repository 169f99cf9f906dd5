"""The training loop: corpus -> batches -> AdamW steps -> held-out evaluation -> checkpoints.

    python -m training --preset small --out runs/small
    torchrun --nproc_per_node 4 -m training --preset seed --out runs/seed   # DDP, rank 0 writes

What a run writes into its directory DIR:
    model.safetensors, config.json   the best weights by held-out loss: what the service loads. They are
                                      links into best/, which gpt.save_checkpoint replaces atomically.
    best/                             that checkpoint itself
    last/                             the latest weights (float32), a checkpoint too
    resume.pt                         everything --resume needs: weights, optimizer, step, RNG states
    train.log, metrics.json, loss.png
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gpt import GPT, PRESETS, CharTokenizer, CheckpointError, GPTConfig, load_checkpoint, save_checkpoint
from gpt.checkpoint import read_config
from gpt.scoring import sliding_windows
from training.config import DEFAULT_MAX_STEPS, MIN_LR_RATIO, TrainConfig
from training.data import Corpus, encode_corpus, load_corpus, sample_batch, split, write_atomically

log = logging.getLogger("training")

RESUME_FILE = "resume.pt"
RESUME_FORMAT = "caesar-gpt-resume"
BEST_DIR, LAST_DIR = "best", "last"
LOG_FORMAT, LOG_DATE_FORMAT = "%(asctime)s | %(levelname)s | %(message)s", "%Y-%m-%d %H:%M:%S"
LN_2 = math.log(2)


# ----------------------------------------------------------------------------------------------
# Set-up: processes, devices, logging


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_flag: str) -> Distributed:
    """Read torchrun's environment; start a process group (NCCL on GPUs, gloo on CPU) when WORLD_SIZE > 1."""
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given but CUDA is not available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return Distributed(rank, world_size, device)


def setup_logging(out: Path, is_main: bool) -> None:
    """The seed's log format to the console and DIR/train.log; other ranks only report warnings."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    formatter = logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(out / "train.log", encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)


# ----------------------------------------------------------------------------------------------
# The model, the optimizer and the schedule


def configure_optimizer(model: GPT, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Decay the matrices and embeddings; biases and LayerNorm parameters (1-D) are left alone.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # The fused kernel updates every parameter in one pass, on the CPU as on CUDA.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99), fused=fused)


def learning_rate(step: int, config: TrainConfig, max_steps: int) -> float:
    """Linear warmup to config.lr, then cosine decay to MIN_LR_RATIO * lr at max_steps."""
    warmup = config.warmup_steps if config.warmup_steps is not None else min(200, max_steps // 20)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    min_lr = config.lr * MIN_LR_RATIO
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - min_lr)


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bfloat16 autocast on CUDA by default, plain float32 on CPU; None means no autocast."""
    if config.dtype == "bfloat16" or (config.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@torch.no_grad()
def held_out_loss(model: GPT, ids: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None,
                  block_size: int | None = None, batch_size: int = 16, world: Distributed = Distributed()
                  ) -> float:
    """Mean cross-entropy (nats per character) over every character of `ids` after the first.

    Windows of the model's context slide by half a context; each scores only the targets the previous
    window did not, so every character is predicted exactly once, with at least half a context before
    it (except at the very start). Deterministic, so evaluations of different runs compare exactly.
    `block_size` (default: the model's context) is the window, for models trained on shorter ones.
    """
    windows = sliding_windows(len(ids), block_size or model.config.block_size)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, counted targets
    mine = windows[world.rank::world.world_size]
    for i in range(0, len(mine), batch_size):
        # Windows of one length batch together; only the last window of the text can be shorter.
        for length in sorted({end - begin for begin, end, _ in mine[i:i + batch_size]}):
            group = [w for w in mine[i:i + batch_size] if w[1] - w[0] == length]
            x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
            y = torch.stack([ids[b + 1:e + 1] for b, e, _ in group]).to(device)
            with torch.autocast(device.type, dtype) if dtype else nullcontext():
                logits, _ = model(x)
            losses = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (B, T)
            for row, (_, _, n_scored) in enumerate(group):
                total[0] += losses[row, -n_scored:].sum()
                total[1] += n_scored
    if world.enabled:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


# ----------------------------------------------------------------------------------------------
# Saving and resuming


def link_best_checkpoint(out: Path) -> None:
    """Make DIR itself a loadable checkpoint: relative links to best/'s two files.

    gpt.save_checkpoint swaps a whole directory in one rename, which would take train.log, last/ and
    resume.pt with it if DIR were the target; so the best weights live in best/ and DIR links to them.
    The links never change, and each read through them sees whichever best/ is in place.
    """
    for name in ("model.safetensors", "config.json"):
        link = out / name
        if not link.is_symlink():
            link.unlink(missing_ok=True)
            link.symlink_to(Path(BEST_DIR) / name)


def load_resume_state(out: Path) -> dict[str, Any]:
    path = out / RESUME_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist (has this run saved a checkpoint yet?)")
    # weights_only: plain tensors and containers, never arbitrary pickled objects; mmap: no copy in memory.
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if state.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path}: not a {RESUME_FORMAT} file")
    return state


def previous_command(out: Path) -> str | None:
    """The command(s) that made the run being resumed, so its checkpoints record a chain that remakes them."""
    try:
        return read_config(out / LAST_DIR)["training"].get("command")
    except CheckpointError:
        return None


def gather_rng_states(world: Distributed) -> dict[str, list[torch.Tensor]]:
    """Every rank's dropout RNG state (each rank draws its own masks), collected for rank 0 to save."""
    states = {"cpu": torch.get_rng_state()}
    if world.device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(world.device)
    if not world.enabled:
        return {k: [v] for k, v in states.items()}
    gathered: list[dict[str, torch.Tensor]] = [{} for _ in range(world.world_size)]
    dist.all_gather_object(gathered, states)
    return {k: [g[k] for g in gathered] for k in states}


def restore_rng_states(saved: dict[str, list[torch.Tensor]], world: Distributed) -> None:
    if len(saved["cpu"]) != world.world_size:
        log.warning("resume.pt was saved by %d processes, this run has %d: dropout RNG streams are reseeded",
                    len(saved["cpu"]), world.world_size)
        return
    torch.set_rng_state(saved["cpu"][world.rank])
    if world.device.type == "cuda" and "cuda" in saved:
        torch.cuda.set_rng_state(saved["cuda"][world.rank], world.device)


# ----------------------------------------------------------------------------------------------
# The run


@dataclass
class TrainResult:
    step: int
    best_val_loss: float
    history: list[dict[str, float | None]] = field(default_factory=list)
    tokens_per_second: float = 0.0
    model: GPT | None = None  # the trained model (this rank's replica), for callers that go on using it


def build_model(config: TrainConfig, corpus: Corpus, resume_state: dict | None
                ) -> tuple[GPT, CharTokenizer, str | None]:
    """The model, its tokenizer and preset name: resumed, fine-tuned from a checkpoint, or fresh."""
    if resume_state is not None:
        tokenizer = CharTokenizer(resume_state["vocab"])
        model = GPT(GPTConfig(**resume_state["model_config"]))
        model.load_state_dict(resume_state["model"])
        return model, tokenizer, resume_state["preset"]
    if config.init_from:
        checkpoint = load_checkpoint(config.init_from)
        shape = {**checkpoint.model.config.to_dict(), "dropout": config.dropout}
        model = GPT(GPTConfig(**shape))
        model.load_state_dict(checkpoint.model.state_dict())
        return model, checkpoint.tokenizer, checkpoint.config.get("preset")
    if config.preset is None:
        raise ValueError("--preset is required unless --init-from or --resume gives the model")
    tokenizer = CharTokenizer.from_text(corpus.text)
    overrides = {name: value for name in ("n_layer", "n_head", "n_embd", "block_size")
                 if (value := getattr(config, name)) is not None}
    shape = {**PRESETS[config.preset].to_dict(), **overrides, "vocab_size": tokenizer.vocab_size,
             "dropout": config.dropout}
    if shape["n_embd"] % shape["n_head"]:
        raise ValueError(f"the width ({shape['n_embd']}) must be a multiple of the heads ({shape['n_head']})")
    return GPT(GPTConfig(**shape)), tokenizer, config.preset


class StopRequest:
    """SIGINT/SIGTERM ask the loop to save and stop at the next step boundary instead of dying mid-step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(config: TrainConfig, command: str | None = None, stop_at: int | None = None) -> TrainResult:
    """Run training as `config` says. `stop_at` ends the run early at that step, saved and resumable,
    as an interruption would (the schedule still aims at max_steps)."""
    out = Path(config.out)
    world = setup_distributed(config.device)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if world.enabled:
        dist.barrier()
    if not config.resume and (out / RESUME_FILE).exists():
        raise FileExistsError(f"{out} already holds a training run: pass --resume to continue it, "
                              "or choose another --out")
    setup_logging(out, world.is_main)
    resume_state = load_resume_state(out) if config.resume else None
    if resume_state is not None and command is not None and (previous := previous_command(out)):
        command = f"{previous} && {command}"

    corpus = load_corpus(config.corpus, config.data)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model, tokenizer, preset = build_model(config, corpus, resume_state)
    if resume_state is not None and resume_state["corpus_sha256"] != corpus.sha256:
        raise ValueError(f"--resume: the corpus has changed (sha256 {corpus.sha256}, the run was "
                         f"trained on {resume_state['corpus_sha256']})")
    # A fine-tuned checkpoint carries the record of the one it started from, so that its config.json
    # alone names every command and corpus hash that reproduce it.
    init_from_training = read_config(config.init_from).get("training") if config.init_from else None
    train_ids, val_ids = split(encode_corpus(corpus, tokenizer))
    block_size = config.block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise ValueError(f"--block-size {block_size} exceeds the model's context ({model.config.block_size})")
    if len(val_ids) <= block_size // 2 or len(train_ids) <= block_size:
        raise ValueError(f"{corpus.name}: {len(corpus.text)} characters is too short "
                         f"for a context of {block_size}")

    tokens_per_step = config.batch_size * config.grad_accum * block_size * world.world_size
    steps_per_epoch = len(train_ids) / tokens_per_step
    if config.max_steps is not None:
        max_steps = config.max_steps
    elif config.epochs is not None:
        max_steps = math.ceil(config.epochs * steps_per_epoch)
    else:
        max_steps = DEFAULT_MAX_STEPS

    device = world.device
    model.to(device)
    optimizer = configure_optimizer(model, config, device)
    amp_dtype = autocast_dtype(config, device)
    batch_generator = torch.Generator().manual_seed(config.seed)  # batch order, shared by all ranks
    torch.manual_seed(config.seed + 1 + world.rank)  # dropout: a stream of its own per rank

    step, tokens_seen, best_val_loss, history = 0, 0, math.inf, []
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        batch_generator.set_state(resume_state["batch_rng"])
        restore_rng_states(resume_state["rng"], world)
        step, tokens_seen = resume_state["step"], resume_state["tokens_seen"]
        best_val_loss, history = resume_state["best_val_loss"], resume_state["history"]
        log.info("Training resumed from the last checkpoint: %s (step %d, held-out loss %.4f)",
                 out / RESUME_FILE, step, history[-1]["val_loss"] if history else math.nan)

    raw_model = model
    if config.compile:
        model = torch.compile(model)
    if world.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    log.info("model: %s preset, %s parameters, %d layers, %d heads, width %d, context %d, vocabulary %d",
             preset, f"{raw_model.num_parameters():,}", raw_model.config.n_layer, raw_model.config.n_head,
             raw_model.config.n_embd, block_size, tokenizer.vocab_size)
    log.info("corpus: %s, %s characters (sha256 %s): %s to train on, the last %s held out",
             corpus.name, f"{len(corpus.text):,}", corpus.sha256[:16], f"{len(train_ids):,}",
             f"{len(val_ids):,}")
    log.info("run: %d steps of %s tokens (%.2f steps per epoch) on %s x %d, autocast %s, lr %g, "
             "batch %d x %d x %d", max_steps, f"{tokens_per_step:,}", steps_per_epoch, device.type,
             world.world_size, amp_dtype, config.lr, config.batch_size, config.grad_accum, world.world_size)

    def metadata(train_loss: float, val_loss: float) -> dict[str, Any]:
        return {
            "step": step, "epoch": round(tokens_seen / len(train_ids), 4),
            "val_loss": round(val_loss, 6), "val_bits_per_char": round(val_loss / LN_2, 6),
            "train_loss": round(train_loss, 6), "corpus": corpus.name, "corpus_sha256": corpus.sha256,
            "command": command, "world_size": world.world_size, "tokens_seen": tokens_seen,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "init_from": config.init_from, "init_from_training": init_from_training,
            "split": "last 10% of the corpus held out",
            "hyperparameters": config.to_dict() | {"max_steps": max_steps, "block_size": block_size},
        }

    def evaluate_and_save(train_loss: float) -> None:
        nonlocal best_val_loss
        val_loss = held_out_loss(raw_model, val_ids, device, amp_dtype, block_size, world=world)
        history.append({"step": step, "epoch": tokens_seen / len(train_ids), "train_loss": train_loss,
                        "val_loss": val_loss, "tokens_seen": tokens_seen})
        improved = val_loss < best_val_loss
        best_val_loss = min(best_val_loss, val_loss)
        rng = gather_rng_states(world)  # collective: every rank takes part
        log.info("step %d/%d | epoch %.2f | train loss %.4f | held-out loss %.4f (%.3f bits/char)%s | "
                 "%s tokens/s | lr %.2e", step, max_steps, tokens_seen / len(train_ids), train_loss, val_loss,
                 val_loss / LN_2, " *best*" if improved else "", f"{tokens_per_second():,.0f}",
                 learning_rate(min(step, max_steps - 1), config, max_steps))
        if not world.is_main:
            return
        meta = metadata(train_loss, val_loss)
        save_checkpoint(out / LAST_DIR, raw_model, tokenizer, preset=preset, metadata=meta)
        # best/ before resume.pt: a resume state never counts an improvement that best/ does not hold
        # (a kill between the two resumes from the previous state, which evaluates this step again).
        if improved:
            save_dtype = getattr(torch, config.save_dtype)
            save_checkpoint(out / BEST_DIR, raw_model, tokenizer, preset=preset, metadata=meta,
                            dtype=save_dtype)
            link_best_checkpoint(out)
        resume_state = {
            "format": RESUME_FORMAT, "step": step, "tokens_seen": tokens_seen, "best_val_loss": best_val_loss,
            "history": history, "config": config.to_dict(), "preset": preset, "vocab": tokenizer.chars,
            "model_config": raw_model.config.to_dict(), "corpus_sha256": corpus.sha256,
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
            "batch_rng": batch_generator.get_state(), "rng": rng,
        }
        write_atomically(out / RESUME_FILE, lambda f: torch.save(resume_state, f))

    throughput = {"seconds": 0.0, "tokens": 0}  # training steps only: evaluations and saves are not counted

    def tokens_per_second() -> float:
        return throughput["tokens"] / throughput["seconds"] if throughput["seconds"] > 0 else 0.0

    if step == 0 and not config.resume:
        initial_loss = held_out_loss(raw_model, val_ids, device, amp_dtype, block_size, world=world)
        history.append({"step": 0, "epoch": 0.0, "train_loss": None, "val_loss": initial_loss,
                        "tokens_seen": 0})
        log.info("step 0 | held-out loss %.4f before training", history[-1]["val_loss"])

    model.train()
    running_loss, running_steps = torch.zeros((), device=device), 0
    show_progress = world.is_main and sys.stderr.isatty()
    last_saved_step = step
    bar = tqdm(total=max_steps, initial=step, disable=not show_progress, unit="step", dynamic_ncols=True)
    with StopRequest() as stop, logging_redirect_tqdm([log]), bar:
        while step < max_steps:
            step_started = time.perf_counter()
            lr = learning_rate(step, config, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro_step in range(config.grad_accum):
                # Every rank draws the same global batch and keeps its own slice: one RNG for the whole job.
                global_batch = config.batch_size * world.world_size
                x, y = sample_batch(train_ids, global_batch, block_size, batch_generator)
                rows = slice(world.rank * config.batch_size, (world.rank + 1) * config.batch_size)
                x, y = x[rows].to(device, non_blocking=True), y[rows].to(device, non_blocking=True)
                # Gradients are all-reduced once per optimizer step, on the last micro-batch.
                sync = not world.enabled or micro_step == config.grad_accum - 1
                with nullcontext() if sync else model.no_sync():
                    with torch.autocast(device.type, amp_dtype) if amp_dtype else nullcontext():
                        _, loss = model(x, y)
                    (loss / config.grad_accum).backward()
                running_loss += loss.detach() / config.grad_accum
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running_steps += 1
            tokens_seen += tokens_per_step
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # kernels run asynchronously; time the work, not its launch
            throughput["tokens"] += tokens_per_step
            throughput["seconds"] += time.perf_counter() - step_started
            if show_progress:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")

            stopping = step == stop_at or _any_rank(stop.requested, world)
            if step % config.eval_interval == 0 or step == max_steps or stopping:
                if world.enabled:
                    dist.all_reduce(running_loss)
                train_loss = running_loss.item() / running_steps / world.world_size
                evaluate_and_save(train_loss)
                last_saved_step = step
                running_loss.zero_()
                running_steps = 0
            if stopping:
                log.info("stopped at step %d; continue with --resume", step)
                break

    result = TrainResult(step, best_val_loss, history, tokens_per_second(), raw_model)
    if world.is_main and step == max_steps and last_saved_step == step:
        write_report(out, result, preset, corpus)
    if world.enabled:
        dist.barrier()
    return result


def _any_rank(flag: bool, world: Distributed) -> bool:
    if not world.enabled:
        return flag
    value = torch.tensor(float(flag), device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def write_report(out: Path, result: TrainResult, preset: str | None, corpus: Corpus) -> None:
    """metrics.json and loss.png, once the run reaches max_steps."""
    from training.plots import plot_loss_curves

    best = min((h for h in result.history if h["step"] > 0), key=lambda h: h["val_loss"])
    metrics = {
        "preset": preset, "corpus": corpus.name, "corpus_sha256": corpus.sha256, "steps": result.step,
        "best_step": best["step"], "best_val_loss": best["val_loss"],
        "best_val_bits_per_char": best["val_loss"] / LN_2,
        "final_train_loss": result.history[-1]["train_loss"],
        "final_val_loss": result.history[-1]["val_loss"],
        "tokens_per_second": result.tokens_per_second, "history": result.history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_loss_curves(result.history, out / "loss.png", title=f"{preset or 'model'} on {corpus.name}")
    log.info("best held-out loss %.4f (%.3f bits/char) at step %d; wrote %s", best["val_loss"],
             best["val_loss"] / LN_2, best["step"], out / "metrics.json")


def command_line(argv: list[str]) -> str:
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if "RANK" not in os.environ:
        return f"python -m training {shlex.join(argv)}".strip()
    launcher = f"torchrun --nproc_per_node {processes} -m training"
    return f"{launcher} {shlex.join(argv)}".strip()
