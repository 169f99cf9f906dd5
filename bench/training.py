"""Training throughput on the CPU: our GPT vs Hugging Face's GPT2LMHeadModel, same shape, same batch,
same optimizer, same loss, same starting weights.

    .venv/bin/python -m bench.training            # seed shape, batch 4 x 256, 5 timed steps each
    .venv/bin/python -m bench.training --quick    # 2 timed steps each (< 2 minutes)

One step = forward, cross-entropy, backward, gradient clipping at 1.0, AdamW step, zero_grad: what
training/'s loop does per micro-batch, with its optimizer (training.train.configure_optimizer:
AdamW, betas (0.9, 0.99), weight decay on matrices only) when training/ is importable. The peers
alternate step by step, so load from elsewhere on the machine hits both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from bench.common import (
    Table,
    base_parser,
    command_line,
    corpus_text,
    interleaved,
    machine_line,
    median,
    plot_bars,
    publish,
    random_model,
    set_threads,
    spread,
    tokenizer,
)
from bench.convert_hf import to_hf
from gpt import PRESETS


def make_optimizer(model: torch.nn.Module, fused: bool = True) -> torch.optim.Optimizer:
    """training/'s optimizer (fused AdamW) when importable, else the same settings written out here;
    `fused=False` gives the same AdamW as a loop over the parameters (torch's default)."""
    try:
        from training.config import TrainConfig
        from training.train import configure_optimizer
        optimizer = configure_optimizer(model, TrainConfig(out="-"), torch.device("cpu"))
        if not fused:
            optimizer = torch.optim.AdamW(optimizer.param_groups, fused=False, **{
                k: optimizer.defaults[k] for k in ("lr", "betas", "eps")})
        return optimizer
    except ImportError:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), fused=fused)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               logits_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> None:
    logits = logits_of(x)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--preset", default="seed", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--steps", type=int, help="timed steps per peer (default 5, --quick 2)")
    parser.add_argument("--dropout", type=float, default=0.1, help="as training/'s default")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    steps = args.steps or (2 if args.quick else 5)

    tok = tokenizer()
    ours = random_model(args.preset, tok.vocab_size, dropout=args.dropout)
    hf = to_hf(ours)  # a copy of the same starting weights
    ours.train()
    hf.train()

    text = corpus_text()
    ids = torch.tensor(tok.encode(text[: 200_000]))
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(ids) - args.block_size - 1, (args.batch_size,), generator=g)
    x = torch.stack([ids[s:s + args.block_size] for s in starts])
    y = torch.stack([ids[s + 1:s + 1 + args.block_size] for s in starts])
    tokens = x.numel()

    peers = {
        "ours": (ours, make_optimizer(ours), lambda t: ours(t)[0]),
        "HF GPT2LMHeadModel": (hf, make_optimizer(hf, fused=False), lambda t: hf(input_ids=t).logits),
        "HF GPT2LMHeadModel + fused AdamW": (hf, make_optimizer(hf), lambda t: hf(input_ids=t).logits),
        "ours, unfused AdamW": (ours, make_optimizer(ours, fused=False), lambda t: ours(t)[0]),
    }
    times = interleaved({name: (lambda m=m, o=o, f=f: train_step(m, o, f, x, y))
                         for name, (m, o, f) in peers.items()}, repeats=steps, warmup=1)

    table = Table(["peer", "tokens/s", "s/step", "step spread"])
    rates = {}
    for name, ts in times.items():
        rates[name] = tokens / median(ts)
        table.add(name, rates[name], median(ts), spread(ts))
    ratios = Table(["ratio", "value"])
    hf_rate, hf_fused = rates["HF GPT2LMHeadModel"], rates["HF GPT2LMHeadModel + fused AdamW"]
    # The target compares like with like: the same optimizer on both sides, fused and unfused.
    ratios.add("ours / HF, both with fused AdamW (target >= 1.2x)", f"{rates['ours'] / hf_fused:.2f}x")
    ratios.add("ours / HF, both with torch's default AdamW (target >= 1.2x)",
               f"{rates['ours, unfused AdamW'] / hf_rate:.2f}x")
    ratios.add("ours (fused AdamW, training/'s choice) / HF (default AdamW)",
               f"{rates['ours'] / hf_rate:.2f}x")

    header = (f"`{command_line(argv)}`\n\n{args.preset} shape, {ours.num_parameters():,} parameters, CPU "
              f"float32, batch {args.batch_size} x {args.block_size} = {tokens} tokens/step, dropout "
              f"{args.dropout}, {steps} timed steps per peer after 1 warm-up, alternating (median); "
              f"{machine_line()}.")
    publish(args, "training", "Training throughput (CPU)", header, [table, ratios], lambda png: plot_bars(
        png, f"Training tokens/s, {args.preset}, CPU", "tokens / second", rates))


if __name__ == "__main__":
    main()
