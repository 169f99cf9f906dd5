"""Batching: aggregate characters/s with 1..32 rows decoding together, at three levels, against
Hugging Face `generate` at batch 1 and 8 on the same weights.

    .venv/bin/python -m bench.batching            # seed shape, rows 1 4 8 16 32
    .venv/bin/python -m bench.batching --quick    # rows 1 4 8, fewer steps (< 2 minutes)

Levels:
- library: `gpt.generate.start` for each row, then timed `advance` steps over one KVCache
  (steady-state decode; prefill not counted); again with the projections on nn.Linear's own
  route (before gpt.model.Linear's CPU few-row routes), as a before/after; and with the compiled
  decode step (`gpt.compile_decode`: inductor's packed GEMM kernels; left out by `--no-compile`,
  and by `--quick` unless it is given `--compile`);
- engine:  `service.engine.Engine`, all requests submitted at once, wall time to the last
  character (prefill, scheduling and delivery included); again with `compile=True`;
- http:    the real server (`python -m service`), concurrent non-streaming POST /generate.
"""

from __future__ import annotations

import asyncio
import sys
import time

import torch
from transformers import GenerationConfig

from bench.common import (
    Table,
    add_compile_option,
    base_parser,
    command_line,
    compile_wanted,
    free_port,
    machine_line,
    median,
    plain_linear,
    plot_lines,
    prompt_of,
    publish,
    random_checkpoint,
    random_model,
    running_server,
    set_threads,
    spread,
    tokenizer,
)
from bench.convert_hf import to_hf
from gpt import GPT, PRESETS, CharTokenizer, KVCache, SamplingParams, Sequence, advance, compile_decode, start

GREEDY = SamplingParams(temperature=0.0)


def library_rate(model: GPT, tok: CharTokenizer, cache: KVCache, ids: list[int], rows: int,
                 steps: int) -> float:
    """Aggregate characters/s of `steps` batched decode steps over `rows` rows."""
    config = model.config
    seqs = [Sequence(ids, steps + 1, GREEDY, tok.decode, config.vocab_size, config.block_size)
            for _ in range(rows)]
    for row, seq in enumerate(seqs):
        start(model, cache, seq, row)
    begin = time.perf_counter()
    for _ in range(steps):
        advance(model, cache, seqs)
    elapsed = time.perf_counter() - begin
    for row in range(rows):
        cache.free(row)
    return rows * steps / elapsed


def engine_rate(engine: object, ids: list[int], rows: int, steps: int) -> float:
    from service.engine import Failed, Finished, GenerationRequest

    async def run() -> float:
        begin = time.perf_counter()
        handles = [engine.submit(GenerationRequest(ids, steps, GREEDY)) for _ in range(rows)]
        for handle in handles:
            while True:
                event = await handle.next_event()
                if isinstance(event, Failed):
                    raise RuntimeError(f"engine request failed: {event}")
                if isinstance(event, Finished):
                    break
        return rows * steps / (time.perf_counter() - begin)

    return asyncio.run(run())


def http_rate(base: str, prompt: str, rows: int, steps: int) -> float:
    import httpx

    async def run() -> float:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": steps, "temperature": 0}}
        async with httpx.AsyncClient(base_url=base, timeout=600) as client:
            begin = time.perf_counter()
            answers = await asyncio.gather(*(client.post("/generate", json=body) for _ in range(rows)))
            elapsed = time.perf_counter() - begin
        for answer in answers:
            answer.raise_for_status()
        return rows * steps / elapsed

    return asyncio.run(run())


def hf_rate(hf: torch.nn.Module, ids: list[int], rows: int, steps: int) -> float:
    config = GenerationConfig(max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
    input_ids = torch.tensor([ids] * rows)
    begin = time.perf_counter()
    with torch.inference_mode():
        hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    return rows * steps / (time.perf_counter() - begin)


def make_engine(model: GPT, tok: CharTokenizer, max_rows: int, compile: bool = False) -> object | None:
    try:
        from service.engine import Engine
    except ImportError as e:
        print(f"engine level skipped: {e}", file=sys.stderr)
        return None
    engine = Engine(model, tok, max_batch_size=max_rows, max_queue=max_rows, warmup=False, compile=compile)
    engine.start()
    deadline = time.monotonic() + 60
    while not engine.ready:
        if time.monotonic() > deadline:
            raise TimeoutError("engine not ready")
        time.sleep(0.05)
    return engine


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--preset", default="seed", choices=sorted(PRESETS))
    parser.add_argument("--rows", type=int, nargs="+", help="concurrent rows (default 1 4 8 16 32)")
    parser.add_argument("--steps", type=int, help="new characters per row (default 64, --quick 16)")
    parser.add_argument("--repeats", type=int, help="default 3, --quick 1")
    parser.add_argument("--prompt-length", type=int, default=64)
    add_compile_option(parser)
    parser.add_argument("--levels", nargs="+", default=["library", "engine", "http"],
                        choices=["library", "engine", "http"])
    args = parser.parse_args(argv)
    compiled_peers = compile_wanted(args)
    set_threads(args.threads)
    row_counts = args.rows or ([1, 4, 8] if args.quick else [1, 4, 8, 16, 32])
    steps = args.steps or (16 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)

    tok = tokenizer()
    model = random_model(args.preset, tok.vocab_size)
    prompt = prompt_of(args.prompt_length)
    ids = tok.encode(prompt)
    max_rows = max(row_counts)
    cache = KVCache(model.config, max_rows)
    hf = to_hf(model)

    rates: dict[str, dict[int, list[float]]] = {}
    def library_plain(rows: int) -> float:
        with plain_linear():
            return library_rate(model, tok, cache, ids, rows, steps)

    peers = {"library": lambda rows: library_rate(model, tok, cache, ids, rows, steps),
             "library, nn.Linear route": library_plain}
    if compiled_peers:
        compiled_cache = KVCache(model.config, max_rows)
        compile_decode(model, compiled_cache)
        peers["library, compiled"] = lambda rows: library_rate(model, tok, compiled_cache, ids, rows, steps)
    engines = {}
    if "engine" in args.levels:
        for name, compile in (("engine", False), ("engine, compiled", True)):
            if (compiled_peers or not compile) and (engine := make_engine(model, tok, max_rows, compile)):
                engines[name] = engine
                peers[name] = lambda rows, engine=engine: engine_rate(engine, ids, rows, steps)
    peers = {name: fn for name, fn in peers.items() if name.split(",")[0] in args.levels}

    def measure_all() -> None:
        for peer in peers.values():  # warm-up; a compiled step compiles for 1 row, then for more
            peer(1)
            peer(min(2, max_rows))
        for _ in range(repeats):
            for rows in row_counts:
                for name, peer in peers.items():
                    rates.setdefault(name, {}).setdefault(rows, []).append(peer(rows))
            for rows in (1, 8):
                rates.setdefault("HF generate", {}).setdefault(rows, []).append(hf_rate(hf, ids, rows, steps))

    if "http" in args.levels:
        checkpoint = random_checkpoint(args.preset)
        port = free_port()
        command = [sys.executable, "-m", "service", "--checkpoint", str(checkpoint), "--port", str(port),
                   "--threads", str(args.threads), "--max-batch-size", str(max_rows), "--device", "cpu",
                   "--log-level", "warning"]
        with running_server(command, port) as base:
            peers["http"] = lambda rows: http_rate(base, prompt, rows, steps)
            measure_all()
    else:
        measure_all()
    for engine in engines.values():
        engine.shutdown()

    levels = [name for name in ("library", "library, nn.Linear route", "library, compiled", "engine",
                                "engine, compiled", "http") if name in rates]
    table = Table(["rows", *(f"{name} chars/s" for name in levels), "HF generate chars/s",
                   *(f"{name} vs 1 row" for name in levels), "spread (library)"])
    for rows in row_counts:
        meds = [median(rates[name][rows]) for name in levels]
        ones = [median(rates[name][1]) if 1 in rates[name] else float("nan") for name in levels]
        hf_cell = median(rates["HF generate"][rows]) if rows in rates["HF generate"] else "-"
        table.add(rows, *meds, hf_cell, *(f"{m / o:.1f}x" for m, o in zip(meds, ones, strict=True)),
                  spread(rates[levels[0]][rows]))

    ratios = Table(["ratio", "value"])
    hf1, hf8 = median(rates["HF generate"][1]), median(rates["HF generate"][8])
    for name in levels:
        if 8 in rates[name] and 1 in rates[name]:
            ratios.add(f"{name}: 8 rows / 1 row (target >= 5x)",
                       f"{median(rates[name][8]) / median(rates[name][1]):.1f}x")
            ratios.add(f"{name}: 8 rows / HF generate batch 8", f"{median(rates[name][8]) / hf8:.1f}x")
    ratios.add("HF generate: batch 8 / batch 1", f"{hf8 / hf1:.1f}x")

    header = (f"`{command_line(argv)}`\n\n{args.preset} shape, {model.num_parameters():,} parameters, CPU "
              f"float32, greedy, {len(ids)}-character prompt, {steps} new characters per row, "
              f"{repeats} repeats (median); {machine_line()}.\n"
              "library: steady-state decode steps only; engine and http: wall time from submission to "
              "the last character, prefill included.")
    series = {name: (row_counts, [median(rates[name][r]) for r in row_counts]) for name in levels}
    series["HF generate"] = ([1, 8], [hf1, hf8])
    publish(args, "batching", "Batching (CPU)", header, [table, ratios], lambda png: plot_lines(
        png, f"Aggregate decode rate, {args.preset}, CPU", "rows", "characters / second", series, logx=True))


if __name__ == "__main__":
    main()
