"""The training run's settings: one dataclass, and the command line that fills it."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields

from gpt import PRESETS
from training.data import CORPORA, DEFAULT_CORPUS

SAVE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class TrainConfig:
    out: str  # the checkpoint directory this run writes
    preset: str | None = None  # model shape; taken from the checkpoint with --init-from or --resume
    n_layer: int | None = None  # these four override the preset's shape
    n_head: int | None = None
    n_embd: int | None = None
    corpus: str = DEFAULT_CORPUS
    data: str | None = None  # a UTF-8 text file to train on instead of a named corpus
    max_steps: int | None = None  # optimizer steps; when neither this nor epochs is set, DEFAULT_MAX_STEPS
    epochs: float | None = None  # passes over the training split, converted to steps
    batch_size: int = 32  # sequences per micro-batch, per process
    block_size: int | None = None  # a new model's context; fine-tuning: characters per sequence (default all)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate: linear warmup to it, then cosine decay to MIN_LR_RATIO of it
    warmup_steps: int | None = None  # default: 5% of max_steps, at most 200
    weight_decay: float = 0.1  # on matrices and embeddings only, never on biases or LayerNorm gains
    dropout: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm (clipping is always on)
    eval_interval: int = 250  # steps between held-out evaluations, each of which writes the checkpoints
    device: str = "auto"  # auto, cpu or cuda
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16
    save_dtype: str = "float32"  # dtype of the best checkpoint's weights (the one the service loads)
    compile: bool = False
    seed: int = 1337
    resume: bool = False
    init_from: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_MAX_STEPS = 2000
MIN_LR_RATIO = 0.1
# Settings a resumed run may change; everything else must stay as saved for the run to continue exactly.
RESUMABLE_OVERRIDES = {"max_steps", "epochs", "eval_interval", "device", "compile", "resume", "out"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train a character-level GPT and write a checkpoint directory the service can load.")
    # Every default is None here so that a resumed run can tell which flags were given explicitly;
    # the real defaults live in TrainConfig.
    add = parser.add_argument
    add("--preset", choices=sorted(PRESETS), help="model shape (gpt/model.py PRESETS)")
    add("--out", help="checkpoint directory to write (best weights, last/, resume.pt, train.log, metrics)")
    add("--corpus", choices=sorted(CORPORA), help=f"named corpus (default: {DEFAULT_CORPUS})")
    add("--data", help="train on this UTF-8 text file instead of a named corpus")
    add("--max-steps", type=int, help=f"optimizer steps to train to (default: {DEFAULT_MAX_STEPS})")
    add("--epochs", type=float, help="passes over the training split (instead of --max-steps)")
    add("--batch-size", type=int, help="sequences per micro-batch per process (default: 32)")
    add("--n-layer", type=int, help="transformer blocks (overrides the preset's)")
    add("--n-head", type=int, help="attention heads (overrides the preset's)")
    add("--n-embd", type=int, help="width (overrides the preset's)")
    add("--block-size", type=int, help="context of a new model, overriding the preset's, and the characters "
        "per training sequence; with --init-from, a sequence length up to the model's context")
    add("--grad-accum", type=int, help="micro-batches per optimizer step (default: 1)")
    add("--lr", type=float, help="peak learning rate; warmup then cosine decay (default: 1e-3)")
    add("--warmup-steps", type=int, help="linear warmup steps (default: 5%% of the steps, at most 200)")
    add("--weight-decay", type=float, help="AdamW weight decay (default: 0.1)")
    add("--dropout", type=float, help="dropout probability (default: 0.1)")
    add("--grad-clip", type=float, help="max gradient norm, always applied (default: 1.0)")
    add("--eval-interval", type=int, help="steps between evaluations and checkpoint writes (default: 250)")
    add("--device", choices=("auto", "cpu", "cuda"), help="default: auto (cuda when available)")
    add("--dtype", choices=("auto", "float32", "bfloat16"), help="autocast dtype (default: auto)")
    add("--save-dtype", choices=SAVE_DTYPES, help="dtype of the saved best weights (default: float32)")
    add("--compile", action="store_const", const=True, help="torch.compile the model")
    add("--seed", type=int, help="seed for weights, batch order and dropout (default: 1337)")
    add("--resume", action="store_const", const=True,
        help="continue the run in --out exactly where it stopped")
    add("--init-from", metavar="CKPT", help="start from a trained checkpoint's weights (fine-tuning)")
    add("--summary", action="store_true", help="print the model summary table and exit")
    return parser


def explicit_settings(args: argparse.Namespace) -> dict:
    """The TrainConfig fields the command line set explicitly."""
    names = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}
