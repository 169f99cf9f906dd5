"""Per-row cost of a decode step: the model step alone against the whole step, at the library level.

    .venv/bin/python -m bench.engine                                  # the shipped checkpoint
    .venv/bin/python -m bench.engine --checkpoint checkpoints/caesar-small
    .venv/bin/python -m bench.engine --preset small                   # random weights of a preset
    .venv/bin/python -m bench.engine --quick                          # 1 thread, fewer steps

For each torch thread count (`--thread-counts`, default 1 and 2), sampling (sampled: temperature 0.8,
top_k 40, a seed per row; greedy: temperature 0; `--sampling mixed`, not run by default: as sampled but
each row's top_k its own, 20 to 60, which takes the sampler's sorting route where one shared k does
not) and number of rows R (default 1, 8, 32, 64), the
same R sequences ("BRUTUS.\\n", prefilled by `gpt.generate.start_rows`) take `--steps` decode steps
three ways, `--repeats` times:

- whole step: `gpt.generate.advance` over the R sequences: the model step, sampling and the text
  each token releases;
- model step: the `gpt.generate.decode_step` call inside that whole step (the forward alone, logits
  out), timed from inside it;
- engine iteration: `service.engine.Engine`'s scheduler loop with R requests running (the decode step
  through `advance`, then settling: events, finished rows, delivery), in process, with an `on_events`
  sink that does what service/engine_process.py's `forward` does: each iteration's deliveries, by
  request id, handed to an `Outbox`, whose thread packs, pickles and writes them down a pipe (a
  child process reads and drops them). Timed between consecutive deliveries while all R requests
  run, admissions and the last step left out.

It prints microseconds per step and per row outside the model: (whole - model) / R and
(engine - model) / R. Issue 18's target: at most 10 us per row outside the model at 64 rows.
The model step is timed inside each whole step and each engine iteration (ModelClock), so the cost
outside the model is each step's own difference, not that of two measurements a burst of load from
elsewhere could tell apart. Every figure is a median over all the steps (or iterations) of all
repeats; "outside the model" is the median of the step-by-step differences.

The library's steps and each engine run get a thread of their own, which ends with them, and this
process's main thread runs none of the model: with OpenMP, each thread that runs parallel work keeps
a team of workers until it ends, and two teams on the same cores slow both (`gpt.device.one_cpu_thread`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from bench.common import (
    Table,
    base_parser,
    command_line,
    machine_line,
    median,
    plot_lines,
    publish,
    resolve_checkpoint,
    section,
    set_threads,
    spread,
)
from gpt import KVCache, SamplingParams, Sequence, advance, load_checkpoint
from gpt.device import one_cpu_thread
from gpt.generate import start_rows
from gpt.model import GPT

TARGET_US_PER_ROW = 10.0
PROMPT = "BRUTUS.\n"
T = TypeVar("T")


def on_a_thread_of_its_own(work: Callable[[], T]) -> T:
    """`work()` on a new thread, which ends with it (its OpenMP team too); its result or its exception."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-engine-work") as pool:
        return pool.submit(work).result()


def sampling_params(kind: str, row: int) -> SamplingParams:
    if kind == "sampled":
        return SamplingParams(temperature=0.8, top_k=40, seed=1000 + row)
    if kind == "mixed":
        return SamplingParams(temperature=0.8, top_k=20 + row % 41, seed=1000 + row)
    return SamplingParams(temperature=0.0)


class ModelClock:
    """Times every `gpt.generate.decode_step` call (the one the whole step and the engine make through
    `gpt.generate.step_tokens`) while installed, so that each step's model time is taken from inside
    that very step: the cost outside the model is not a difference of two noisy measurements."""

    def __init__(self) -> None:
        self.total = 0.0
        self.module = sys.modules["gpt.generate"]
        self.real = self.module.decode_step

    def _timed(self, *args: Any) -> Any:
        begin = time.perf_counter()
        try:
            return self.real(*args)
        finally:
            self.total += time.perf_counter() - begin

    def __enter__(self) -> ModelClock:
        self.module.decode_step = self._timed
        return self

    def __exit__(self, *exc: object) -> None:
        self.module.decode_step = self.real

    def take(self) -> float:
        """Model seconds since the last take."""
        total, self.total = self.total, 0.0
        return total


class Library:
    """`gpt.generate.advance` over R rows, step by step, with the model step timed inside each."""

    def __init__(self, model: GPT, decode: Callable[[list[int]], str], ids: list[int], max_rows: int) -> None:
        self.model, self.decode, self.ids = model, decode, ids
        with one_cpu_thread():
            self.cache = KVCache(model.config, max_rows)

    def steps(self, kind: str, rows: int, steps: int) -> tuple[list[float], list[float]]:
        """Seconds of the model step inside each of `steps` advance calls over `rows` rows prefilled
        with the prompt, and of each whole call (on a thread of their own)."""
        return on_a_thread_of_its_own(lambda: self._steps(kind, rows, steps))

    def _steps(self, kind: str, rows: int, steps: int) -> tuple[list[float], list[float]]:
        config = self.model.config
        seqs = [Sequence(self.ids, steps + 2, sampling_params(kind, r), self.decode, config.vocab_size,
                         config.block_size) for r in range(rows)]
        start_rows(self.model, self.cache, seqs, list(range(rows)))
        model_s, whole_s = [], []
        with ModelClock() as clock:
            for _ in range(steps):
                clock.take()
                begin = time.perf_counter()
                advance(self.model, self.cache, seqs)
                whole_s.append(time.perf_counter() - begin)
                model_s.append(clock.take())
        for row in range(rows):
            self.cache.free(row)
        return model_s, whole_s


class EngineIterations:
    """An in-process service.engine.Engine whose deliveries go down a pipe as the engine process
    sends them (through an Outbox; a child process reads them), each delivery stamped with the time
    and the model time spent since the last one. Each run of `iterations` has an engine of its own,
    shut down at its end, so that its scheduler thread (and OpenMP team) ends with it."""

    def __init__(self, model: GPT, tokenizer: Any, ids: list[int], max_rows: int) -> None:
        from service.engine_process import Outbox

        # The far end of the pipe: a process that reads everything and keeps nothing.
        drain = "import sys\nwhile sys.stdin.buffer.read(1 << 16): pass"
        self.reader = subprocess.Popen([sys.executable, "-c", drain], stdin=subprocess.PIPE)
        self.pipe = Connection(os.dup(self.reader.stdin.fileno()), readable=False)
        self.outbox = Outbox(self.pipe)
        self.model, self.tokenizer, self.ids, self.max_rows = model, tokenizer, ids, max_rows
        self.clock = ModelClock()
        self.stamps: list[tuple[float, int, float]] = []  # (time, running rows, model s since the last)
        self.done = threading.Event()
        self.expect = 0
        self.engine: Any = None

    def _start_engine(self) -> None:
        from service.engine import Engine

        with one_cpu_thread():  # its KV cache; this thread never runs the model
            self.engine = Engine(self.model, self.tokenizer, max_batch_size=self.max_rows,
                                 max_queue=self.max_rows, warmup=False, on_events=self._sink)
        self.engine.start()
        deadline = time.monotonic() + 120
        while not self.engine.ready:
            if time.monotonic() > deadline or not self.engine.alive:
                raise RuntimeError("the engine did not start")
            time.sleep(0.02)

    def _sink(self, deliveries: Any) -> None:
        items = [(handle.request_id, events) for handle, events in deliveries]
        running = self.engine.running_rows
        self.outbox.send(("events", items, (self.engine.queue_size, running)))  # as engine_process's forward
        self.stamps.append((time.perf_counter(), running, self.clock.take()))
        if self.expect and running == 0 and self.engine.queue_size == 0:
            self.done.set()

    def iterations(self, kind: str, rows: int, steps: int) -> tuple[list[float], list[float]]:
        """Seconds of each scheduler iteration while all `rows` requests ran, and of the model step
        inside each."""
        from service.engine import GenerationRequest
        from service.engine_process import ForwardedHandle

        self.stamps, self.expect = [], rows
        self.done.clear()
        self._start_engine()
        try:
            with self.clock:
                for r in range(rows):
                    request = GenerationRequest(list(self.ids), steps + 2, sampling_params(kind, r))
                    self.engine.submit(request, ForwardedHandle(r))
                if not self.done.wait(timeout=600):
                    raise TimeoutError("the engine did not finish")
        finally:
            self.engine.shutdown()
        self.expect = 0
        stamps = self.stamps
        full = [i for i, (_, running, _) in enumerate(stamps) if running == rows]
        # Consecutive deliveries while all rows were running, after the first such delivery (whose
        # iteration admitted requests): the interval between them, and the model time inside it.
        pairs = [(stamps[i][0] - stamps[i - 1][0], stamps[i][2]) for i in full[1:]
                 if stamps[i - 1][1] == rows and i - 1 != full[0]]
        if not pairs:
            raise RuntimeError(f"no steady iteration with {rows} rows (deliveries: {len(stamps)})")
        return [iteration for iteration, _ in pairs], [model for _, model in pairs]

    def shutdown(self) -> None:
        self.outbox.close()
        self.pipe.close()
        self.reader.stdin.close()
        self.reader.wait(timeout=30)


def us(repeats: list[list[float]]) -> float:
    """Microseconds: the median of every step of every repeat."""
    return median([t for steps in repeats for t in steps]) * 1e6


def outside_us(repeats: list[list[float]], models: list[list[float]], rows: int) -> float:
    """Microseconds per row outside the model: the median of the step-by-step differences."""
    return median([t - m for ts, ms in zip(repeats, models, strict=True)
                   for t, m in zip(ts, ms, strict=True)]) * 1e6 / rows


def repeat_spread(repeats: list[list[float]]) -> str:
    """How far the repeats' own medians lie from each other."""
    return spread([median(steps) for steps in repeats])


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], threads=None, threads_help="unused: see --thread-counts")
    parser.add_argument("--checkpoint", help="checkpoint directory (default: the shipped one)")
    parser.add_argument("--preset", help="random weights of this preset instead of a checkpoint")
    parser.add_argument("--thread-counts", type=int, nargs="+", help="torch threads (default 1 2, --quick 1)")
    parser.add_argument("--rows", type=int, nargs="+", help="rows decoding together (default 1 8 32 64)")
    parser.add_argument("--steps", type=int, help="timed steps per repeat (default 48, --quick 12; at most "
                        "the context less the prompt)")
    parser.add_argument("--repeats", type=int, help="default 5, --quick 2")
    parser.add_argument("--sampling", nargs="+", default=["sampled", "greedy"],
                        choices=["sampled", "greedy", "mixed"])
    parser.add_argument("--no-engine", action="store_true", help="leave out the engine iteration")
    args = parser.parse_args(argv)
    thread_counts = args.thread_counts or ([args.threads] if args.threads else [1] if args.quick else [1, 2])
    row_counts = args.rows or [1, 8, 32, 64]
    repeats = args.repeats or (2 if args.quick else 5)

    with one_cpu_thread():
        checkpoint, which = resolve_checkpoint(args.checkpoint, args.preset)
        loaded = load_checkpoint(checkpoint)
    model, tok = loaded.model.eval(), loaded.tokenizer
    ids = tok.encode(PROMPT)
    context = model.config.block_size
    steps = min(args.steps or (12 if args.quick else 48), context - len(ids) - 4)
    max_rows = max(row_counts)

    # (threads, sampling, rows, peer) -> one list of per-step seconds per repeat
    samples: dict[tuple[int, str, int, str], list[list[float]]] = {}
    for threads in thread_counts:
        set_threads(threads)
        library = Library(model, tok.decode, ids, max_rows)
        engine = None if args.no_engine else EngineIterations(model, tok, ids, max_rows)
        try:
            for kind in args.sampling:
                for rows in row_counts:
                    library.steps(kind, rows, min(steps, 4))  # warm-up
                    if engine is not None:
                        engine.iterations(kind, rows, min(steps, 4))
                    for _ in range(repeats):
                        model_s, whole_s = library.steps(kind, rows, steps)
                        samples.setdefault((threads, kind, rows, "model"), []).append(model_s)
                        samples.setdefault((threads, kind, rows, "whole"), []).append(whole_s)
                        if engine is not None:
                            iterations, models = engine.iterations(kind, rows, steps)
                            samples.setdefault((threads, kind, rows, "engine"), []).append(iterations)
                            samples.setdefault((threads, kind, rows, "engine model"), []).append(models)
                    model_us = us(samples[(threads, kind, rows, "model")])
                    whole_us = us(samples[(threads, kind, rows, "whole")])
                    outside = outside_us(samples[(threads, kind, rows, "whole")],
                                         samples[(threads, kind, rows, "model")], rows)
                    print(f"{threads} threads, {kind}, {rows} rows: model {model_us:,.0f} us, whole "
                          f"{whole_us:,.0f} us, {outside:.1f} us/row outside", flush=True)
        finally:
            if engine is not None:
                engine.shutdown()

    with_engine = not args.no_engine
    columns = ["threads", "sampling", "rows", "model step us", "whole step us"]
    columns += ["engine iteration us", "model step inside it us"] if with_engine else []
    columns += ["outside the model, whole step us/row"]
    columns += ["outside the model, engine us/row"] if with_engine else []
    columns += ["whole step chars/s", "spread (model / whole)"]
    table = Table(columns)
    targets = Table(["threads", "sampling", f"outside the model at {max_rows} rows, whole step us/row",
                     *(["engine us/row"] if with_engine else []), f"target <= {TARGET_US_PER_ROW:g}"])
    series: dict[str, tuple[list[int], list[float]]] = {}
    for threads in thread_counts:
        for kind in args.sampling:
            for rows in row_counts:
                key = (threads, kind, rows)
                model_us, whole_us = us(samples[(*key, "model")]), us(samples[(*key, "whole")])
                cells: list[object] = [threads, kind, rows, model_us, whole_us]
                outside = [outside_us(samples[(*key, "whole")], samples[(*key, "model")], rows)]
                if with_engine:
                    cells += [us(samples[(*key, "engine")]), us(samples[(*key, "engine model")])]
                    engine_models = samples[(*key, "engine model")]
                    outside.append(outside_us(samples[(*key, "engine")], engine_models, rows))
                spreads = " / ".join(repeat_spread(samples[(*key, peer)]) for peer in ("model", "whole"))
                table.add(*cells, *outside, rows / whole_us * 1e6, spreads)
                for label, value in zip(["whole", "engine"], outside, strict=False):
                    xs, ys = series.setdefault(f"{label}, {kind}, {threads} thr", ([], []))
                    xs.append(rows)
                    ys.append(value)
                if rows == max_rows:
                    worst = max(outside)
                    targets.add(threads, kind, *outside,
                                "met" if worst <= TARGET_US_PER_ROW else f"not met ({worst:.0f})")

    mixed = "; mixed = sampled with each row's top_k its own (20-60)" if "mixed" in args.sampling else ""
    header = (f"`{command_line(argv)}`\n\nWeights: {which} ({model.config.n_layer} layers x "
              f"{model.config.n_embd}, context {context}, {model.num_parameters():,} parameters). CPU "
              f"float32, prompt {PROMPT!r}, {steps} timed steps per repeat, {repeats} repeats (median over "
              "every step; the spread is that of the repeats' medians); sampled = temperature 0.8, top_k 40, "
              f"a seed per row; greedy = temperature 0{mixed}. {machine_line()}.\n"
              "model step = `gpt.generate.decode_step` (the forward alone); whole step = "
              "`gpt.generate.advance` (model step, sampling, text); engine iteration = "
              "`service.engine.Engine`'s scheduler loop in process (advance, settling, and the deliveries "
              "sent down a pipe as the engine process sends them). The model step is timed inside each whole "
              "step and each iteration. Outside the model = the median of the step-by-step differences "
              "(whole or engine - model), per row.")
    key, title = section(args, "engine", "Per-row cost of a step outside the model (CPU)", checkpoint)
    publish(args, key, title, header, [table, targets],
            lambda png: plot_lines(png, "Cost per row outside the model step", "rows", "us per row", series,
                                   logx=True))


if __name__ == "__main__":
    main()
