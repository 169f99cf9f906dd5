"""Decode at batch 1 on the CPU: our KV-cached path vs Hugging Face `generate` on the same weights,
the no-cache nanoGPT loop, and the memory-bandwidth bound.

    .venv/bin/python -m bench.decode            # seed shape, 256 and 512 new characters
    .venv/bin/python -m bench.decode --quick    # 128 new characters, fewer repeats (< 2 minutes)

The compiled step (gpt.compile_decode) runs as a peer too, except with --quick (--compile adds it).

Random weights are fine: speed does not depend on their values. Both models are checked to give
the same logits (atol 1e-4) before anything is timed, and greedy decoding must give the same text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from bench.common import (
    Table,
    add_compile_option,
    base_parser,
    command_line,
    compile_wanted,
    copy_bandwidth,
    machine_line,
    median,
    plain_linear,
    plot_bars,
    prompt_of,
    publish,
    random_model,
    set_threads,
    spread,
    tokenizer,
)
from bench.convert_hf import check_same_logits, to_hf
from gpt import GPT, PRESETS, KVCache, SamplingParams, compile_decode, generate, generate_reference

COMPILED = "ours, compiled (gpt.compile_decode)"


@dataclass
class Run:
    first_char_s: float  # time to first character: prompt prefill + first token
    total_s: float
    new_chars: int
    text: str = ""

    @property
    def step_s(self) -> float:
        """Seconds per decode step after the first character."""
        return (self.total_s - self.first_char_s) / max(self.new_chars - 1, 1)


class FirstTokenTimer(BaseStreamer):
    """HF streamer that notes when the first generated token arrives (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def run_ours(model: GPT, ids: list[int], new: int, decode: Callable[[list[int]], str],
             cache: KVCache | None = None) -> Run:
    start = time.perf_counter()
    first = None
    chunks = []
    for chunk in generate(model, ids, decode, new, SamplingParams(temperature=0.0), cache=cache):
        first = first or time.perf_counter()
        chunks.append(chunk.text)
    total = time.perf_counter() - start
    return Run(first - start, total, new, "".join(chunks))


def run_hf(hf: torch.nn.Module, ids: list[int], new: int, decode: Callable[[list[int]], str]) -> Run:
    # eos_token_id=None: our vocabulary has no end token, so every run makes exactly `new` characters.
    config = GenerationConfig(max_new_tokens=new, do_sample=False, use_cache=True, eos_token_id=None,
                              pad_token_id=0)
    input_ids = torch.tensor([ids])
    timer = FirstTokenTimer()
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                          streamer=timer)
    total = time.perf_counter() - start
    generated = out[0, len(ids):].tolist()
    return Run((timer.first_token_at or start + total) - start, total, len(generated), decode(generated))


def run_reference(model: GPT, ids: list[int], new: int, decode: Callable[[list[int]], str]) -> Run:
    start = time.perf_counter()
    seq = generate_reference(model, ids, decode, 1, SamplingParams(temperature=0.0))
    first = time.perf_counter() - start
    seq = generate_reference(model, ids, decode, new, SamplingParams(temperature=0.0))
    # The first character was timed on its own above; the total is one full run plus that.
    total = time.perf_counter() - start - first
    return Run(first, total, new, decode(seq.generated_ids))


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--preset", default="seed", choices=sorted(PRESETS))
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new", type=int, nargs="+", help="new characters per run (default 256 512)")
    parser.add_argument("--repeats", type=int, help="timed runs per peer (default 3, --quick 2)")
    add_compile_option(parser)
    parser.add_argument("--reference-new", type=int,
                        help="new characters for the no-cache loop (default: the longest --new; --quick 32)")
    args = parser.parse_args(argv)
    compiled_peer = compile_wanted(args)
    set_threads(args.threads)
    lengths = args.new or ([128] if args.quick else [256, 512])
    repeats = args.repeats or (2 if args.quick else 3)
    reference_new = args.reference_new or (32 if args.quick else max(lengths))

    tok = tokenizer()
    model = random_model(args.preset, tok.vocab_size)
    config = model.config
    hf = to_hf(model)
    ids = tok.encode(prompt_of(args.prompt_length))
    if len(ids) + max(*lengths, reference_new) > config.block_size:
        parser.error(f"prompt + new characters exceed the {config.block_size}-position context, "
                     "which HF generate cannot go past")
    diff = check_same_logits(model, hf, ids)
    print(f"{args.preset}: {model.num_parameters():,} parameters; HF logits match (max |diff| {diff:.1e})")

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(weight_bytes)
    bound_step_s = weight_bytes / bandwidth

    def run_ours_plain(n: int) -> Run:
        with plain_linear():
            return run_ours(model, ids, n, tok.decode)

    peers = {"ours (KV cache)": lambda n: run_ours(model, ids, n, tok.decode),
             "ours, nn.Linear route": run_ours_plain,
             "HF generate": lambda n: run_hf(hf, ids, n, tok.decode)}
    if compiled_peer:
        compiled_cache = KVCache(config, 1)
        compile_decode(model, compiled_cache)
        started = time.perf_counter()
        run_ours(model, ids, 2, tok.decode, compiled_cache)
        print(f"compiled the decode step in {time.perf_counter() - started:.0f} s")
        peers[COMPILED] = lambda n: run_ours(model, ids, n, tok.decode, compiled_cache)
    results: dict[tuple[str, int], list[Run]] = {}
    for new in lengths:
        for peer in peers.values():  # warm-up: allocator, caches, lazy inits
            peer(min(new, 16))
        for _ in range(repeats):  # round-robin, so load from elsewhere hits both peers
            for name, peer in peers.items():
                results.setdefault((name, new), []).append(peer(new))
        ours, theirs = results[("ours (KV cache)", new)][0], results[("HF generate", new)][0]
        same = ours.text == theirs.text
        print(f"{new} new characters: greedy texts {'identical' if same else 'DIFFER'}")
    reference = run_reference(model, ids, reference_new, tok.decode)

    table = Table(["peer", "new chars", "chars/s", "ms/step", "first char ms", "repeat spread"])
    rates: dict[tuple[str, int], float] = {}  # chars/s, median of the repeats
    step_s: dict[tuple[str, int], float] = {}
    for (name, new), runs in results.items():
        rates[name, new] = median([r.new_chars / r.total_s for r in runs])
        step_s[name, new] = median([r.step_s for r in runs])
        table.add(name, new, rates[name, new], step_s[name, new] * 1e3,
                  median([r.first_char_s for r in runs]) * 1e3, spread([r.total_s for r in runs]))
    table.add("no-cache loop (nanoGPT)", reference_new, reference.new_chars / reference.total_s,
              reference.step_s * 1e3, reference.first_char_s * 1e3, "1 run")
    table.add("bandwidth bound", "-", 1 / bound_step_s, bound_step_s * 1e3, "-",
              f"copy {bandwidth / 1e9:.1f} GB/s")

    compiled_columns = [] if not compiled_peer else ["compiled / HF generate", "compiled / ours",
                                                   "bound ms / compiled ms"]
    ratios = Table(["new chars", "ours / HF generate", "ours / nn.Linear route", "ours / no-cache loop",
                    "bound ms / ours ms", *compiled_columns])
    for new in lengths:
        ours, theirs = rates["ours (KV cache)", new], rates["HF generate", new]
        plain = rates["ours, nn.Linear route", new]
        ref_rate = reference.new_chars / reference.total_s
        row = [new, f"{ours / theirs:.2f}x", f"{ours / plain:.2f}x", f"{ours / ref_rate:.1f}x",
               f"{bound_step_s / step_s['ours (KV cache)', new]:.0%}"]
        if compiled_peer:
            compiled = rates[COMPILED, new]
            row += [f"{compiled / theirs:.2f}x", f"{compiled / ours:.2f}x",
                    f"{bound_step_s / step_s[COMPILED, new]:.0%}"]
        ratios.add(*row)

    header = (f"`{command_line(argv)}`\n\n{args.preset} shape, {model.num_parameters():,} parameters "
              f"({weight_bytes / 1e6:.0f} MB of float32 weights), batch 1, greedy, "
              f"{len(ids)}-character prompt, {repeats} repeats (median); {machine_line()}.\n"
              f"The no-cache loop ran once for {reference_new} characters.")
    bars = {f"{name} {new}": rate for (name, new), rate in rates.items()}
    bars |= {"no-cache loop": reference.new_chars / reference.total_s, "bandwidth bound": 1 / bound_step_s}
    publish(args, "decode", "Decode, batch 1 (CPU)", header, [table, ratios], lambda png: plot_bars(
        png, f"Decode at batch 1, {args.preset}, CPU float32", "characters / second", bars))


if __name__ == "__main__":
    main()
