"""CPU decode with cheaper weights: float32 vs bfloat16 vs int8 dynamic quantization, with the
held-out loss each one costs.

    .venv/bin/python -m bench.quantize            # 256 new characters, 3 repeats
    .venv/bin/python -m bench.quantize --quick    # 64 new characters, 1 repeat

Loss: the shipped checkpoint (checkpoints/caesar; a random `small` until it exists) on the
held-out last 10% of the corpus, scored by training/'s evaluation. Speed: batch 1 greedy decode
through the KV cache, on the same checkpoint and on a random model of --speed-preset (seed).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from bench.common import (
    SHIPPED_CHECKPOINT,
    Table,
    base_parser,
    command_line,
    corpus_text,
    machine_line,
    median,
    plot_bars,
    prompt_of,
    publish,
    random_checkpoint,
    random_model,
    set_threads,
    spread,
)
from gpt import GPT, SamplingParams, generate, load_checkpoint
from gpt import model as gpt_model
from training.data import split


def int8_dynamic(model: GPT) -> nn.Module:
    """Weights of every projection stored as int8, activations quantized on the fly (fbgemm)."""
    from torch.ao.quantization import quantize_dynamic

    plain = copy.deepcopy(model)
    # torch's converter accepts nn.Linear itself only, not our subclass: hand it plain ones.
    for name, module in list(plain.named_modules()):
        if isinstance(module, gpt_model.Linear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, child, linear)
    return quantize_dynamic(plain, {nn.Linear}, dtype=torch.qint8)


def variants(model: GPT) -> dict[str, nn.Module]:
    return {"float32": model, "bfloat16 weights": copy.deepcopy(model).to(torch.bfloat16),
            "int8 dynamic": int8_dynamic(model)}


@torch.no_grad()
def held_out_loss(model: nn.Module, ids: torch.Tensor, block_size: int) -> float:
    try:
        from training.train import held_out_loss as training_held_out_loss
        return training_held_out_loss(model, ids, torch.device("cpu"))
    except ImportError:  # the same windows, written out: each target scored once
        losses, stride = [], block_size // 2
        for begin in range(0, len(ids) - block_size - 1, stride):
            x = ids[begin:begin + block_size][None]
            y = ids[begin + 1:begin + 1 + block_size][None]
            logits, _ = model(x)
            scored = slice(0 if begin == 0 else stride, None)
            losses.append(F.cross_entropy(logits[0, scored].float(), y[0, scored], reduction="none"))
        return torch.cat(losses).mean().item()


def decode_rate(model: nn.Module, ids: list[int], new: int) -> float:
    begin = time.perf_counter()
    for _ in generate(model, ids, lambda t: "", new, SamplingParams(temperature=0.0)):
        pass
    return new / (time.perf_counter() - begin)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="default: the shipped one, else a random small")
    parser.add_argument("--speed-preset", default="seed", help="shape of the random model timed too")
    parser.add_argument("--new", type=int, help="new characters per timed run (default 256, --quick 64)")
    parser.add_argument("--repeats", type=int, help="default 3, --quick 1")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    new = args.new or (64 if args.quick else 256)
    repeats = args.repeats or (1 if args.quick else 3)
    path = args.checkpoint or (SHIPPED_CHECKPOINT if (SHIPPED_CHECKPOINT / "config.json").is_file()
                               else random_checkpoint("small"))
    loaded = load_checkpoint(path)
    tok, model = loaded.tokenizer, loaded.model
    _, held_out = split(torch.tensor(tok.encode(corpus_text()), dtype=torch.long))
    prompt_ids = tok.encode(prompt_of(min(64, model.config.block_size // 4)))
    speed_model = random_model(args.speed_preset, tok.vocab_size)

    table = Table(["weights", f"held-out loss (nats/char, {path.name})", "loss cost",
                   f"{path.name} chars/s", f"{args.speed_preset} chars/s", f"{args.speed_preset} vs float32",
                   "spread"])
    shipped, speed = variants(model), variants(speed_model)
    rates: dict[str, dict[str, list[float]]] = {"shipped": {}, "speed": {}}
    for group, models in (("shipped", shipped), ("speed", speed)):
        for m in models.values():
            decode_rate(m, prompt_ids, 8)  # warm-up
        for _ in range(repeats):
            for name, m in models.items():
                rates[group].setdefault(name, []).append(decode_rate(m, prompt_ids, new))
    losses = {name: held_out_loss(m, held_out, model.config.block_size) for name, m in shipped.items()}
    base_speed = median(rates["speed"]["float32"])
    for name in shipped:
        table.add(name, f"{losses[name]:.4f}", f"{losses[name] - losses['float32']:+.4f}",
                  median(rates["shipped"][name]), median(rates["speed"][name]),
                  f"{median(rates['speed'][name]) / base_speed:.2f}x", spread(rates["speed"][name]))

    header = (f"`{command_line(argv)}`\n\nCheckpoint {path}; batch 1 greedy decode, {new} new characters, "
              f"{repeats} repeats (median); {machine_line()}.")
    bars = {n: median(v) for n, v in rates["speed"].items()}
    publish(args, "quantize", "Cheaper weights for CPU decode", header, [table], lambda png: plot_bars(
        png, f"CPU decode, {args.speed_preset} shape, by weight type", "characters / second", bars))


if __name__ == "__main__":
    main()
