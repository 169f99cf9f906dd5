"""GPU benchmarks for one lent H200 (run through bench/gpu.sh, which bounds each part in time).

    .venv/bin/python -m bench.gpu decode      # batch 1, bfloat16: eager, compiled (CUDA graphs), HF, bound
    .venv/bin/python -m bench.gpu batching    # aggregate chars/s at 1..64 rows, compiled decode
    .venv/bin/python -m bench.gpu training    # seed preset tokens/s and MFU (bf16 autocast, fused AdamW)
    .venv/bin/python -m bench.gpu all --dry-run   # tiny shapes on the CPU: checks the code paths only

Targets (issue 8): batch 1 >= 3,000 chars/s; 64 rows >= 60,000 chars/s; training >= 40% MFU.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F

from bench.common import Table, median, prompt_of, random_model, tokenizer, write_section
from gpt import KVCache, SamplingParams, Sequence, advance, generate, start
from gpt.generate import compile_decode

# Dense bfloat16 tensor-core peak of an H100/H200 SXM (no sparsity), for MFU.
PEAK_BF16_FLOPS = 989e12
GREEDY = SamplingParams(temperature=0.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(10):
        begin = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - begin)
    return 2 * nbytes / min(times)


def decode_rate(model: torch.nn.Module, ids: list[int], new: int, cache: KVCache, decode: object) -> float:
    device = next(model.parameters()).device
    begin = time.perf_counter()
    for _ in generate(model, ids, decode, new, GREEDY, cache=cache):
        pass
    sync(device)
    return new / (time.perf_counter() - begin)


def part_decode(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> str:
    tok = tokenizer()
    model = random_model(args.preset, tok.vocab_size).to(device=device, dtype=dtype)
    ids = tok.encode(prompt_of(16 if args.dry_run else 64))
    new = args.new
    table = Table(["peer", "chars/s", "ms/step"])
    eager_cache = KVCache(model.config, 1, device=device, dtype=dtype)
    compiled_cache = KVCache(model.config, 1, device=device, dtype=dtype)
    rates: dict[str, list[float]] = {"ours, eager": [], "ours, compiled (CUDA graphs)": []}
    if not args.dry_run:
        compile_decode(model, compiled_cache)
    else:
        del rates["ours, compiled (CUDA graphs)"]
    caches = {"ours, eager": eager_cache, "ours, compiled (CUDA graphs)": compiled_cache}
    for name in rates:  # warm-up (and compilation)
        decode_rate(model, ids, 32, caches[name], tok.decode)
    for _ in range(args.repeats):
        for name in rates:
            rates[name].append(decode_rate(model, ids, new, caches[name], tok.decode))
    try:
        from transformers import GenerationConfig

        from bench.convert_hf import to_hf
        hf = to_hf(model)
        config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        input_ids = torch.tensor([ids], device=device)
        hf_rates = []
        for _ in range(args.repeats + 1):
            begin = time.perf_counter()
            with torch.inference_mode():
                hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
            sync(device)
            hf_rates.append(new / (time.perf_counter() - begin))
        rates["HF generate"] = hf_rates[1:]
    except Exception as e:  # the peer's failure (no transformers, or an API it changed) keeps our rows
        print(f"HF generate left out: {type(e).__name__}: {e}", flush=True)
    for name, values in rates.items():
        table.add(name, median(values), 1e3 / median(values))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound_s = weight_bytes / copy_bandwidth(device, 1 << (20 if args.dry_run else 30))
    table.add("bandwidth bound", 1 / bound_s, bound_s * 1e3)
    return (f"{args.preset}, {str(dtype).removeprefix('torch.')}, batch 1, {len(ids)}-character prompt, "
            f"{new} new characters, {args.repeats} repeats (median); weights {weight_bytes / 1e6:.0f} MB.\n\n"
            + table.markdown())


def part_batching(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> str:
    tok = tokenizer()
    model = random_model(args.preset, tok.vocab_size).to(device=device, dtype=dtype)
    ids = tok.encode(prompt_of(16 if args.dry_run else 64))
    row_counts = [1, 8, 32, 64] if not args.dry_run else [1, 4]
    table = Table(["rows", "eager chars/s", "compiled chars/s", "compiled vs 1 row"])
    results: dict[int, tuple[float, float]] = {}
    for rows in row_counts:
        measured = []
        for compiled in (False, True):
            if compiled and args.dry_run:
                measured.append(float("nan"))
                continue
            cache = KVCache(model.config, rows, device=device, dtype=dtype)
            if compiled:
                compile_decode(model, cache)
            seqs = [Sequence(ids, 10**6, GREEDY, tok.decode, tok.vocab_size, model.config.block_size)
                    for _ in range(rows)]
            for row, seq in enumerate(seqs):
                start(model, cache, seq, row)
            for _ in range(3):  # warm-up, compilation, graph capture
                advance(model, cache, seqs)
            sync(device)
            begin = time.perf_counter()
            for _ in range(args.steps):
                advance(model, cache, seqs)
            sync(device)
            measured.append(rows * args.steps / (time.perf_counter() - begin))
        results[rows] = (measured[0], measured[1])
    one = results[row_counts[0]][1]
    for rows, (eager, compiled) in results.items():
        table.add(rows, eager, compiled, f"{compiled / one:.1f}x" if one == one else "-")
    return (f"{args.preset}, {str(dtype).removeprefix('torch.')}, {args.steps} timed decode steps after 3 "
            "warm-up steps, prefill not counted.\n\n" + table.markdown())


def part_training(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> str:
    tok = tokenizer()
    model = random_model(args.preset, tok.vocab_size).to(device).train()
    batch, block = (args.train_batch, model.config.block_size) if not args.dry_run else (2, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.99), weight_decay=0.1,
                                  fused=device.type == "cuda")
    step_model = torch.compile(model) if not args.dry_run else model
    x = torch.randint(0, tok.vocab_size, (batch, block), device=device)
    y = torch.randint(0, tok.vocab_size, (batch, block), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            logits, _ = step_model(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync(device)
    times = []
    for _ in range(args.train_steps):
        begin = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - begin)
    tokens_per_s = batch * block / median(times)
    c = model.config
    non_embedding = model.num_parameters() - c.vocab_size * c.n_embd - c.block_size * c.n_embd
    # PaLM's accounting: 6 N per token for the matmuls, plus 12 L T d for attention scores and values.
    flops_per_token = 6 * (non_embedding + c.vocab_size * c.n_embd) + 12 * c.n_layer * block * c.n_embd
    mfu = tokens_per_s * flops_per_token / PEAK_BF16_FLOPS
    table = Table(["preset", "batch x block", "tokens/s", "s/step", "MFU (bf16 peak 989 TFLOPS)"])
    table.add(args.preset, f"{batch} x {block}", tokens_per_s, median(times), f"{mfu:.0%}")
    return ("bf16 autocast, torch.compile, fused AdamW, gradient clipping; "
            f"{args.train_steps} timed steps after 3 warm-up.\n\n" + table.markdown())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["decode", "batching", "training", "all"])
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--new", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="timed decode steps per row count")
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, no compile")
    parser.add_argument("--docs", default=None, help="write the tables into this folder's benchmarks.md")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.preset, args.new, args.repeats, args.steps, args.train_steps = "tiny", 16, 1, 4, 1
        device, dtype = torch.device("cpu"), torch.float32
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True
    parts = ["decode", "batching", "training"] if args.part == "all" else [args.part]
    runners = {"decode": part_decode, "batching": part_batching, "training": part_training}
    for part in parts:
        body = runners[part](args, device, dtype)
        print(f"## GPU {part}\n\n{body}\n", flush=True)
        if args.docs:
            from pathlib import Path
            name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU dry run"
            write_section(Path(args.docs), f"gpu-{part}", f"GPU: {part} ({name})", body)


if __name__ == "__main__":
    main()
