"""Short sweeps of the pre-train-then-fine-tune recipe: which shape and schedule reach the lowest
held-out loss on Julius Caesar for a given budget of training tokens.

    python -m training.sweep --out runs/sweep --run n_layer=4,n_embd=256,max_steps=3000 \\
        --run n_layer=6,n_embd=384,lr=1e-3,max_steps=1500

Each `--run` is a set of TrainConfig overrides for the pre-training stage (on the `shakespeare`
corpus, which leaves the play out). Every run is then fine-tuned on the play's first 90% and scored
on its last 10%, and one table row is printed per run. Token budgets are hardware-independent, so a
sweep on a fast machine ranks recipes for a slow one: give each run the steps its shape manages in
the slow machine's time (`tokens/s` in the table, measured with a few steps there).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields, replace
from pathlib import Path

from training.config import TrainConfig
from training.train import train

FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}


def parse_overrides(spec: str) -> dict:
    """'n_layer=4,lr=2e-3' -> {'n_layer': 4, 'lr': 0.002}, typed as TrainConfig declares them."""
    overrides = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        if name not in FIELD_TYPES:
            raise argparse.ArgumentTypeError(f"{name!r} is not a training setting")
        kind = FIELD_TYPES[name]
        overrides[name] = float(value) if "float" in kind else int(value) if "int" in kind else value
    return overrides


def run_label(overrides: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.sweep", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--out", required=True, help="a directory for the runs and results.json")
    add("--run", action="append", type=parse_overrides, required=True,
        help="pre-training overrides, e.g. n_layer=4,n_embd=256,lr=2e-3,max_steps=3000")
    add("--preset", default="small", help="the shape the overrides start from (default: small)")
    add("--batch-size", type=int, default=16)
    add("--dropout", type=float, default=0.1)
    add("--lr", type=float, default=2e-3)
    add("--eval-interval", type=int, default=500)
    add("--finetune-steps", type=int, default=300)
    add("--finetune-lr", type=float, default=3e-4)
    add("--finetune-dropout", type=float, default=0.2)
    add("--device", default="auto")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = TrainConfig(out="", preset=args.preset, corpus="shakespeare", batch_size=args.batch_size,
                       dropout=args.dropout, lr=args.lr, eval_interval=args.eval_interval, device=args.device)
    results = []
    for index, overrides in enumerate(args.run):
        started = time.perf_counter()
        pretrain_dir = out / f"run{index}-pretrain"
        pretrain = replace(base, out=str(pretrain_dir), **overrides)
        pretrained = train(pretrain)
        finetune = TrainConfig(out=str(out / f"run{index}-finetune"), init_from=str(pretrain_dir),
                               corpus="julius-caesar", max_steps=args.finetune_steps, lr=args.finetune_lr,
                               dropout=args.finetune_dropout, batch_size=pretrain.batch_size,
                               block_size=pretrain.block_size, warmup_steps=0,
                               eval_interval=max(1, args.finetune_steps // 10), device=args.device)
        tuned = train(finetune)
        block = pretrain.block_size or pretrained.model.config.block_size
        results.append({
            "run": run_label(overrides), "parameters": pretrained.model.num_parameters(),
            "pretrain_tokens": pretrained.step * pretrain.batch_size * block,
            "pretrain_tokens_per_second": round(pretrained.tokens_per_second),
            "pretrain_held_out": round(pretrained.best_val_loss, 4),
            "julius_caesar_held_out": round(tuned.best_val_loss, 4),
            "seconds": round(time.perf_counter() - started, 1),
        })
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    print("| run | parameters | pre-training tokens | tokens/s | pre-training held-out | "
          "Julius Caesar held-out | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['parameters']:,} | {r['pretrain_tokens']:,} | "
              f"{r['pretrain_tokens_per_second']:,} | {r['pretrain_held_out']:.4f} | "
              f"{r['julius_caesar_held_out']:.4f} | {r['seconds']} |")


if __name__ == "__main__":
    main()
