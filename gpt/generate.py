"""Generation over the static KV cache: prefill, one-token decode, and the streaming generator.

Context rule (the model has `block_size` positions): a row sees at most `block_size` tokens. When
the next token would not fit, the row's window slides to its most recent `3/4 * block_size`
tokens, which are prefilled again from position 0, and generation goes on. Prompts longer than the
context are handled by the same rule, so they keep their last `3/4 * block_size` characters.
An empty prompt starts from token id 0 (a newline for every corpus here), which is not output.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from collections.abc import Sequence as SequenceOf
from functools import lru_cache
from typing import Any, NamedTuple

import torch

from gpt.model import GPT, CacheRows, DecodeRows, KVCache
from gpt.sampling import Sampled, SamplingParams, dense_bias, new_seed, sample_rows
from gpt.tensors import long_tensor

MAX_STOP_STRINGS = 4


class Chunk(NamedTuple):
    """What one generated token released: its text (usually one character; empty while it could
    still be the start of a stop string) and, on the last chunk, why generation ended."""

    text: str
    finish_reason: str | None = None  # "length" or "stop"


class StopMatcher:
    """Holds back text that may be the start of a stop string, so a stop string is never output."""

    def __init__(self, stop: SequenceOf[str] = ()) -> None:
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        self.stop = [s for s in stop if s]
        self.pending = ""

    def push(self, text: str, match: bool = True) -> tuple[str, bool]:
        """Add new text; return what may be output now, and whether a stop string was completed.
        With `match` false (before min_tokens), nothing is held back and nothing stops."""
        if not self.stop or not match:
            released, self.pending = self.pending + text, ""
            return released, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            released, self.pending = self.pending[:min(hits)], ""
            return released, True
        held = next((n for n in range(len(self.pending), 0, -1)
                     if any(s.startswith(self.pending[-n:]) for s in self.stop)), 0)
        cut = len(self.pending) - held
        released, self.pending = self.pending[:cut], self.pending[cut:]
        return released, False

    def flush(self) -> str:
        released, self.pending = self.pending, ""
        return released


@lru_cache(maxsize=16)
def token_texts(decode: Callable[[list[int]], str], vocab_size: int) -> tuple[str, ...]:
    """Each token's text, decoded once per tokenizer rather than once per generated token."""
    return tuple(decode([token]) for token in range(vocab_size))


class Sequence:
    """One generation in progress: its tokens, its sampling state and its cache row."""

    # Slots: a step reads a few attributes of every row, and a slotted object keeps them in one or two
    # cache lines, where an instance dict's lookups touch more (the model step has evicted them all).
    __slots__ = ("tokens", "prompt_length", "max_new_tokens", "min_tokens", "params", "decode", "token_texts",
                 "block_size", "keep", "window_start", "refill", "seed", "seen", "counts", "bias", "logprobs",
                 "scored", "cumulative_logprob", "stop", "generated", "finish_reason", "row",
                 "prompt_truncated", "__weakref__")

    def __init__(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                 decode: Callable[[list[int]], str], vocab_size: int, block_size: int,
                 stop: SequenceOf[str] = (), min_tokens: int = 0, logprobs: int | None = None,
                 ranked: bool = False) -> None:
        self.tokens = list(prompt_ids) or [0]
        self.prompt_length = len(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.min_tokens = min_tokens
        self.params = params
        self.decode = decode
        self.token_texts = token_texts(decode, vocab_size)
        self.block_size = block_size
        self.keep = max(1, 3 * block_size // 4)
        self.window_start = 0
        self.refill = True  # the window's tokens are not (all) in the cache row: prefill before sampling
        self.seed = new_seed(params.seed)
        # The history the penalties read, kept only where the settings need it.
        self.seen: torch.Tensor | None = None  # characters of the prompt and the text so far
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen[torch.tensor(prompt_ids, dtype=torch.long)] = True
        self.counts = torch.zeros(vocab_size) if params.counts_generated else None  # generated only
        self.bias = dense_bias(params.logit_bias, vocab_size)
        self.logprobs = logprobs  # None: no per-token report; n: the log-probability and n alternatives
        # Whether the sampler reports this row's log-probabilities, and cumulative_logprob sums them:
        # for a per-token report, or to rank the row among others (best_of).
        self.scored = logprobs is not None or ranked
        self.cumulative_logprob = 0.0
        self.stop = StopMatcher(stop)
        self.generated = 0
        self.finish_reason: str | None = "length" if max_new_tokens <= 0 else None
        self.row: int | None = None
        self.slide_window()
        self.prompt_truncated = self.window_start > 0

    @property
    def position(self) -> int:
        """The sampler's counter: tokens sampled so far."""
        return self.generated

    @property
    def generated_ids(self) -> list[int]:
        return self.tokens[len(self.tokens) - self.generated:]

    def context(self) -> list[int]:
        return self.tokens[self.window_start:]

    def slide_window(self) -> bool:
        """Apply the context rule; True while the row must be prefilled (again) before its next
        token. Asking again before `accept` gives the same answer, so a failed step can be retried."""
        if len(self.tokens) - self.window_start > self.block_size:
            self.window_start = len(self.tokens) - self.keep
            self.refill = True
        return self.refill

    def accept(self, token: int, logprob: float = 0.0) -> str:
        """Append the next token (with its raw log-probability) and return the text it releases."""
        self.tokens.append(token)
        self.refill = False
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        self.generated += 1
        if self.scored:
            self.cumulative_logprob += logprob
        text, stopped = self.token_texts[token], False
        if self.stop.stop:  # without stop strings nothing is ever held back
            text, stopped = self.stop.push(text, self.generated >= self.min_tokens)
        if stopped:
            self.finish_reason = "stop"
        elif self.generated >= self.max_new_tokens:
            self.finish_reason = "length"
            text += self.stop.flush()
        return text


def prefill(model: GPT, cache: KVCache, row: int, ids: list[int]) -> torch.Tensor:
    """Write a row's tokens into its cache slot from position 0; return the last logits (V,)."""
    return prefill_rows(model, cache, [row], [ids])[0]


def prefill_rows(model: GPT, cache: KVCache, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
    """Write several rows' tokens into their cache slots from position 0 in one forward, the shorter
    prompts padded at the end; return each row's last logits (R, V). The padding only writes keys
    past a row's length, which no query sees and the row's next tokens overwrite."""
    device = cache.k[0].device
    lengths = [len(ids) for ids in prompts]
    idx = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for i, ids in enumerate(prompts):
        idx[i, :len(ids)] = torch.tensor(ids)
    logits = model.forward_cached(idx.to(device), cache, rows, [0] * len(rows))
    for row, n in zip(rows, lengths, strict=True):
        cache.lengths[row] = n
    return logits[torch.arange(len(rows), device=device), torch.tensor(lengths, device=device) - 1]


def padding_groups(lengths: list[int], waste: float = 0.25, max_tokens: int = 8192) -> list[list[int]]:
    """Indices of prompts of these lengths, in groups to prefill together: by length, each group
    padding at most `waste` more tokens than it holds, and at most `max_tokens` tokens padded."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        group = groups[-1] if groups else []
        padded = lengths[i] * (len(group) + 1)  # sorted: this prompt is the group's longest
        held = sum(lengths[j] for j in group) + lengths[i]
        if group and padded <= max_tokens and padded <= (1 + waste) * held:
            group.append(i)
        else:
            groups.append([i])
    return groups


def decode_step(model: GPT, cache: KVCache, rows: list[int], tokens: list[int]) -> torch.Tensor:
    """Feed one token to each of `rows`, each at its own position; return logits (R, V)."""
    if cache.compiled_step is not None:
        logits = cache.compiled_step(rows, tokens)
    else:
        logits = eager_decode(model, cache, rows, tokens)
    for r in rows:
        cache.lengths[r] += 1
    return logits


def eager_decode(model: GPT, cache: KVCache, rows: list[int], tokens: list[int]) -> torch.Tensor:
    """decode_step's forward without a compiled step: logits (R, V); cache.lengths left as they are."""
    idx = long_tensor(tokens, cache.k[0].device)[:, None]
    return model.forward_cached(idx, cache, rows, [cache.lengths[r] for r in rows])[:, -1]


class StaticDecoder(torch.nn.Module):
    """One decode step over every cache row at fixed shapes, attending over the whole cache length,
    so that torch.compile can capture it in a CUDA graph. Rows that are not decoding get a dummy
    token at their next free position, which is overwritten before anything attends to it."""

    def __init__(self, model: GPT, cache: KVCache) -> None:
        super().__init__()
        self.model = model
        self.cache = cache
        self.register_buffer("all_rows", torch.arange(cache.max_batch, device=cache.k[0].device))

    def forward(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """idx, positions: (max_batch, 1). Returns logits (max_batch, V)."""
        length = self.cache.max_len
        mask = CacheRows.causal_mask(positions, length)
        rows = CacheRows(self.all_rows, slice(None), positions, length, mask)
        return self.model.forward_rows(idx, self.cache, rows)[:, -1]


class RowsDecoder(torch.nn.Module):
    """One decode step over the rows it is given, attention included: a graph whose varying shapes
    are the number of rows and how far they attend."""

    def __init__(self, model: GPT, cache: KVCache) -> None:
        super().__init__()
        self.model = model
        self.cache = cache

    def forward(self, idx: torch.Tensor, rows: torch.Tensor, start: torch.Tensor,
                key_positions: torch.Tensor) -> torch.Tensor:
        """idx: (R, 1) tokens for cache rows `rows` (R,) at positions `start` (R,), attending over
        key_positions (L,) = arange(max(start) + 1). Returns logits (R, V)."""
        return self.model.forward_rows(idx, self.cache, DecodeRows(rows, start, key_positions))[:, -1]


class ManyRowsDecoder(RowsDecoder):
    """RowsDecoder for steps of more rows than CompiledRowsStep.max_few_rows. A class of its own
    because dynamo files graphs under the code object of `forward` and does not guard on inductor's
    configuration: this graph, compiled for the CPU library's products, must not be taken for the GEMM
    template's, or the reverse."""

    def forward(self, idx: torch.Tensor, rows: torch.Tensor, start: torch.Tensor,
                key_positions: torch.Tensor) -> torch.Tensor:
        return super().forward(idx, rows, start, key_positions)


# Inductor's CPU GEMM template with the weights frozen into the graph and packed for it: on few rows
# it streams a weight several times faster than MKL does (docs/benchmarks.md). Freezing is read
# when a graph is compiled, which happens at the call that first needs it, so every call sets it.
CPU_GEMM_CONFIG = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP"}

# Past about this many rows the CPU library's products beat that template, so a step of more rows runs a
# second graph (ManyRowsDecoder) compiled without it: the CPU library's products, and inductor's fused
# attention, norms and GELU around them. Shipped model, float32, 1 thread, rows at position 60,
# alternating in one process, ms a step (template / library graph, unfrozen on MKL's products / eager):
# 16 rows 6.7 / 7.3 / 9.2, 32 rows 12.2 / 10.2 / 12.9, 64 rows 22.1 / 16.8 / 22.1, 128 rows 49.9 / 35.1
# / 44.8. A CompiledRowsStep starts from this; the engine's warm-up measures the boundary on the CPU it
# runs on (CompiledRowsStep.choose_boundary), as it moves with the weights' size. Only float32 steps
# have the template's graphs: in bfloat16 (or float16) the two kinds of product round differently, so
# a row's text would depend on how many rows its steps had (docs/benchmarks.md, fourteenth pass).
COMPILED_CPU_MAX_ROWS = 24
# The row counts choose_boundary times both graphs at (2 and up: one row has a graph of its own).
BOUNDARY_ROW_COUNTS = (2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
# The many-rows graph freezes its weights too: with a dynamic row count inductor packs them for oneDNN's
# products, which on an AVX-512 EPYC run the shipped model's 64-row products about a fifth faster than
# MKL does on the plain weights. Its 64-row step at position 100 (float16 cache, alternating in one
# process): 14.6 / 9.8 ms against 16.7 / 11.5 unfrozen on 1 / 2 threads; caesar-small's, whose weights
# sit in cache, within noise. On an AVX2 EPYC, frozen and unfrozen measured even (docs/benchmarks.md).
MANY_ROWS_CONFIG = {"freezing": True, "max_autotune": False}


def compile_decode(model: GPT, cache: KVCache, **compile_options: Any) -> None:
    """Opt in to a compiled decode step for `cache`, the kind that suits its device: CUDA graphs on
    CUDA, inductor's packed GEMM kernels on the CPU. torch.compile options replace the defaults."""
    if cache.k[0].device.type == "cuda":
        compile_static_decode(model, cache, **compile_options)
    else:
        compile_rows_decode(model, cache, **compile_options)


def compile_static_decode(model: GPT, cache: KVCache, **compile_options: Any) -> None:
    """CUDA graphs (mode="reduce-overhead") of a fixed-shape step over every cache row."""
    options = compile_options or {"mode": "reduce-overhead"}
    static = torch.compile(StaticDecoder(model, cache), fullgraph=True, **options)
    cache.compiled_step = lambda rows, tokens: _decode_all_rows(static, cache, rows, tokens)


def compile_rows_decode(model: GPT, cache: KVCache, **compile_options: Any) -> None:
    """Give `cache` a CompiledRowsStep: the step over the decoding rows alone, in inductor's graphs."""
    cache.compiled_step = CompiledRowsStep(model, cache, **compile_options)


class CompiledRowsStep:
    """A step over the decoding rows alone, in three graphs: one for a single row (torch.compile
    specialises it) and one for any other number up to `max_few_rows`, both with the weights frozen
    into the graph and copied once more, packed for CPU_GEMM_CONFIG's kernels; and one for more rows,
    with another packed copy, for oneDNN's products (MANY_ROWS_CONFIG). Each serves any lengths.
    `max_few_rows` starts at COMPILED_CPU_MAX_ROWS; `choose_boundary` measures it instead. The graphs
    of every such step in a process count towards one limit (torch._dynamo.config.recompile_limit, 8):
    caches compiled in one process share it.

    Weights narrower than float32 take the many-rows graph alone (`max_few_rows` 0), a single row sent
    twice: a row's arithmetic on that graph is the same at 2 rows as at 64, so the same seed gives the
    same text alone and in a batch, which in bfloat16 the three graphs' products, each rounding its own
    way, did not."""

    def __init__(self, model: GPT, cache: KVCache, **compile_options: Any) -> None:
        self.cache = cache
        dtype = next(model.parameters()).dtype  # the products', which the boundary is about, not the cache's
        self.max_few_rows = COMPILED_CPU_MAX_ROWS if dtype == torch.float32 else 0
        for buffer in cache.k + cache.v:
            # Fixed sizes: otherwise dynamo would take a step whose row count or length equals the
            # cache's (the warm-up's) for one where they are the same symbol, and compile every other
            # step anew.
            torch._dynamo.mark_static(buffer)
        self.few = torch.compile(RowsDecoder(model, cache), fullgraph=True, dynamic=True, **compile_options)
        self.many = torch.compile(ManyRowsDecoder(model, cache), fullgraph=True, dynamic=True,
                                  **compile_options)

    def __call__(self, rows: list[int], tokens: list[int]) -> torch.Tensor:
        if len(rows) <= self.max_few_rows:
            return self.run(True, rows, tokens)
        if len(rows) == 1:  # twice: both copies write the same keys and values to the same place
            return self.run(False, rows * 2, tokens * 2)[:1]
        return self.run(False, rows, tokens)

    def run(self, few_rows: bool, rows: list[int], tokens: list[int]) -> torch.Tensor:
        """The step on the few-rows graph or on the many-rows one; cache.lengths left as they are."""
        if not torch.is_inference_mode_enabled():
            # Compiled with grad enabled, over weights that require grad, both graphs would be autograd
            # graphs: the few-rows one cannot freeze its weights (on an AVX2 CPU inductor then has no
            # kernel for its products at all), and the many-rows one copies every cache buffer each
            # step (at 64 rows of caesar-small, 44.6 against 8.8 ms).
            with torch.inference_mode():
                return self.run(few_rows, rows, tokens)
        cache, device = self.cache, self.cache.k[0].device
        start = [cache.lengths[r] for r in rows]
        cache.check_position(max(start))  # the eager path's error, before the graph runs
        graph, config = (self.few, CPU_GEMM_CONFIG) if few_rows else (self.many, MANY_ROWS_CONFIG)
        with torch._inductor.config.patch(config):
            return graph(long_tensor(tokens, device)[:, None], long_tensor(rows, device),
                         long_tensor(start, device), torch.arange(max(start) + 1, device=device))

    @torch.inference_mode()
    def choose_boundary(self, max_rows: int, position: int, repeats: int = 5) -> int:
        """Time both graphs at each of BOUNDARY_ROW_COUNTS up to `max_rows` rows (every row at
        `position`, the two alternating, `repeats` times), set `max_few_rows` by `boundary_from_times`
        and return it: where the template's packed products stop winning depends on the weights' size
        and dtype and on the CPU. Writes keys at `position` in the first rows; leaves cache.lengths as
        they were."""
        lengths = list(self.cache.lengths)
        times: dict[int, tuple[float, float]] = {}
        try:
            for count in (n for n in BOUNDARY_ROW_COUNTS if n <= max_rows):
                rows, seconds = list(range(count)), {True: [], False: []}
                for row in rows:
                    self.cache.lengths[row] = position
                for _ in range(repeats):
                    for few_rows in (True, False):
                        began = time.perf_counter()
                        self.run(few_rows, rows, [0] * count)
                        seconds[few_rows].append(time.perf_counter() - began)
                times[count] = (statistics.median(seconds[True]), statistics.median(seconds[False]))
        finally:
            self.cache.lengths[:] = lengths
        self.max_few_rows = boundary_from_times(times, self.max_few_rows)
        return self.max_few_rows


def boundary_from_times(times: dict[int, tuple[float, float]], default: int) -> int:
    """The most rows the few-rows graph should take, from (few, many) seconds a step by row count:
    just below the first count at which the many-rows graph is faster, the largest count timed if it
    never is, `default` if nothing was timed."""
    counts = sorted(times)
    for before, count in zip([1, *counts], counts, strict=False):
        few, many = times[count]
        if many < few:
            return before
    return counts[-1] if counts else default


def _decode_all_rows(static: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], cache: KVCache,
                     rows: list[int], tokens: list[int]) -> torch.Tensor:
    device = cache.k[0].device
    idx = torch.zeros(cache.max_batch, 1, dtype=torch.long)
    positions = torch.tensor([min(n, cache.max_len - 1) for n in cache.lengths])[:, None]
    idx[rows, 0] = torch.tensor(tokens)
    logits = static(idx.to(device), positions.to(device))
    return logits[torch.tensor(rows, device=device)]


@torch.inference_mode()
def start(model: GPT, cache: KVCache, seq: Sequence, row: int) -> str:
    """Give `seq` cache row `row`, prefill its prompt and sample its first token."""
    return start_rows(model, cache, [seq], [row])[0]


def start_rows(model: GPT, cache: KVCache, seqs: list[Sequence], rows: list[int]) -> list[str]:
    """Give each sequence its cache row, prefill the prompts (together, in groups of similar length)
    and sample each first token; return the text each releases."""
    for seq, row in zip(seqs, rows, strict=True):
        seq.row = row
    return accept_all(seqs, step_tokens(model, cache, seqs))


def advance(model: GPT, cache: KVCache, seqs: list[Sequence]) -> list[str]:
    """One new token for each running sequence, in order; return the text each releases."""
    return accept_all(seqs, step_tokens(model, cache, seqs))


def step_tokens(model: GPT, cache: KVCache, seqs: list[Sequence]) -> Sampled:
    """Each sequence's next token, sampled for all rows at once, not yet accepted. Rows that need
    their window prefilled (new, or their context is full) are; all the others share one batched
    decode step. Nothing a sequence holds changes, and each decoding row's cache length is set from
    its accepted tokens first, so a step that raised can be run again, row by row, with the same
    result (the draw is a function of seed and position)."""
    if not torch.is_inference_mode_enabled():  # entering it costs 0.4 us a row at 64 rows: callers
        with torch.inference_mode():           # that step often (the engine) stay inside it
            return step_tokens(model, cache, seqs)
    if not seqs:
        return Sampled([], [], None)
    top_n = max((seq.logprobs or 0 for seq in seqs), default=0)
    refilling = [i for i, seq in enumerate(seqs) if seq.slide_window()]
    if refilling:
        logits = _prefill_contexts(model, cache, seqs, refilling)
    else:
        logits = None
    decoding = [i for i, seq in enumerate(seqs) if not seq.refill] if refilling else list(range(len(seqs)))
    rows = [seqs[i].row for i in decoding]
    if rows != sorted(rows):  # consecutive rows let attention view the cache, not copy it (the engine's are)
        decoding.sort(key=lambda i: seqs[i].row)
        rows.sort()
    if decoding:
        tokens = []
        for i in decoding:  # what the row's accepted tokens put in the cache, whatever ran before
            seq = seqs[i]
            cache.lengths[seq.row] = len(seq.tokens) - seq.window_start - 1
            tokens.append(seq.tokens[-1])
        step_logits = decode_step(model, cache, rows, tokens)
        if logits is None and decoding == list(range(len(seqs))):
            logits = step_logits
        else:
            if logits is None:
                logits = step_logits.new_empty(len(seqs), step_logits.size(-1))
            logits[long_tensor(decoding, logits.device)] = step_logits
    return sample_rows(logits, seqs, top_n)


def accept_all(seqs: list[Sequence], sampled: Sampled) -> list[str]:
    """Each sequence accepts its sampled token; the text each releases."""
    return [seq.accept(token, logprob)
            for seq, token, logprob in zip(seqs, sampled.tokens, sampled.logprobs, strict=True)]


def _prefill_contexts(model: GPT, cache: KVCache, seqs: list[Sequence], indices: list[int]) -> torch.Tensor:
    """Prefill the windows of seqs[i] for i in `indices` into their rows, in groups of similar
    length; return logits (len(seqs), V) holding each one's last logits at its index."""
    logits = None
    for group in padding_groups([len(seqs[i].context()) for i in indices]):
        members = [indices[g] for g in group]
        group_logits = prefill_rows(model, cache, [seqs[i].row for i in members],
                                    [seqs[i].context() for i in members])
        if logits is None:
            logits = group_logits.new_empty(len(seqs), group_logits.size(-1))
        logits[long_tensor(members, logits.device)] = group_logits
    return logits


def generate(model: GPT, prompt_ids: list[int], decode: Callable[[list[int]], str],
             max_new_tokens: int, params: SamplingParams = SamplingParams(),
             stop: SequenceOf[str] = (), cache: KVCache | None = None, row: int = 0) -> Iterator[Chunk]:
    """Stream one generation through the KV cache, one Chunk per generated token."""
    p = next(model.parameters())
    cache = cache or KVCache(model.config, 1, device=p.device, dtype=p.dtype)
    seq = Sequence(prompt_ids, max_new_tokens, params, decode, model.config.vocab_size,
                   model.config.block_size, stop)
    if seq.finish_reason:
        yield Chunk("", seq.finish_reason)
        return
    try:
        text = start(model, cache, seq, row)
        while True:
            yield Chunk(text, seq.finish_reason)
            if seq.finish_reason:
                return
            (text,) = advance(model, cache, [seq])
    finally:
        cache.free(row)


@torch.inference_mode()
def generate_reference(model: GPT, prompt_ids: list[int], decode: Callable[[list[int]], str],
                       max_new_tokens: int, params: SamplingParams = SamplingParams(),
                       stop: SequenceOf[str] = ()) -> Sequence:
    """The no-cache oracle (nanoGPT's sampler): recompute the whole window for every token."""
    device = next(model.parameters()).device
    seq = Sequence(prompt_ids, max_new_tokens, params, decode, model.config.vocab_size,
                   model.config.block_size, stop)
    while seq.finish_reason is None:
        seq.slide_window()
        logits, _ = model(torch.tensor([seq.context()], device=device))
        accept_all([seq], sample_rows(logits[:, -1], [seq], seq.logprobs or 0))
    return seq
