"""The engine: one scheduler thread owns the model and its static KV cache, and runs continuous batching.

Each scheduler iteration
  1. drops waiting requests that were cancelled or waited longer than `queue_timeout_s`,
     and frees the rows of running requests that were cancelled (client gone);
  2. admits waiting requests into free cache rows: prefill + first token, the prompts of the
     admitted requests together (`gpt.generate.step_tokens`), their first characters handed out at once;
  3. runs ONE batched decode step for every running row (`gpt.generate.step_tokens`: the model step,
     then one batched sampling step for all rows), and each row accepts its token;
  4. frees the rows of requests that finished, at once;
  5. hands each request its new text, in one wake-up of the asyncio loop that submitted it (a
     non-streamed request, `final_only`, all of it at once when it ends).

A request's failure is its own: a step that raises runs again row by row (each row's draw depends
only on its seed and position, so the others' text does not change), and only the rows that fail
alone end, with an error.

The HTTP side never touches the model: `submit` (called on the event loop) only appends to the
waiting queue, and each request's events come back through an `asyncio.Queue` in its
`RequestHandle`. Cancelling is a flag that the scheduler reads at the top of every iteration, so a
cancelled row is freed within two decode steps.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any, Protocol

import torch

from gpt import CharTokenizer, KVCache, SamplingParams, Sequence, load_checkpoint
from gpt.device import DTYPES, has_bfloat16_instructions, one_cpu_thread, pick_device, pick_dtype
from gpt.generate import CompiledRowsStep, advance, compile_decode, start_rows, step_tokens
from gpt.model import GPT
from gpt.sampling import Sampled
from gpt.scoring import score

logger = logging.getLogger("service.engine")


# --- What a request asks for, and what comes back ---------------------------------------------

@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    min_tokens: int = 0  # stop strings do not end generation before this many tokens (vLLM's rule)
    logprobs: int | None = None  # report each generated token's log-probability and this many alternatives
    prompt_logprobs: int | None = None  # score the prompt: each character's log-probability and alternatives
    ranked: bool = False  # ranked among samples by its log-probability (best_of): Finished.cumulative_logprob
    # A non-streamed request: its events reach its handle together, with its end, not step by step
    # (vLLM's FINAL_ONLY output): no message across the pipe and no wake-up of its event loop per step.
    final_only: bool = False


@dataclass(frozen=True)
class Admitted:
    """The request got a cache row after waiting `queue_s` seconds."""

    queue_s: float


@dataclass(frozen=True)
class TokenLogprob:
    """A token and its log-probability under the model's raw distribution (before temperature and
    the filters, as vLLM reports them), with the most likely alternatives when they were asked for."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), most likely first


# Not frozen: one is built per row per step, and a frozen one's __init__ costs 2.5x as much.
@dataclass(slots=True)
class TextChunk:
    """What one decode step gave a request: the text it released (usually one character; several
    when characters held back as a possible stop string turn out not to be one; empty while held
    back) and, when the request asked for logprobs, the token sampled (stop strings' included).
    Never both empty."""

    text: str
    time: float  # time.perf_counter() when it was sampled
    token: TokenLogprob | None = None


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "length" or "stop"
    generated_tokens: int  # tokens sampled, including a stop string's (which is not output)
    seed: int
    input_length: int  # prompt characters received
    truncated: bool  # the prompt was longer than the context: only its last part was seen
    last_token_id: int | None  # the last token sampled (None when nothing was generated)
    queue_s: float
    time_to_first_token_s: float  # from submission to the first token sampled
    total_s: float
    # The sum of the sampled tokens' raw log-probabilities (best_of ranks by it), for a request that
    # asked for logprobs or is ranked; 0.0 for any other (its step computes no log-probabilities).
    cumulative_logprob: float = 0.0
    # When asked for: each prompt token's score given the ones before it (the first has none: None).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclass(frozen=True)
class Failed:
    """The request ended without finishing. `error_type`: `queue_timeout` (never admitted),
    `generation` (something this request caused raised, or a step of the model failed),
    `shutdown` (the drain's grace period ran out), `engine_restart` (the engine process died and
    is being restarted: try again)."""

    error_type: str
    message: str


Event = Admitted | TextChunk | Finished | Failed
ENDINGS = (Finished, Failed)  # the events after which a request has no more


class Cancellable(Protocol):
    """What the scheduler needs of a request's handle: whether its client has gone."""

    cancelled: bool


class RequestHandle:
    """The HTTP side's end of one request: its events in order, and a way to cancel it.

    Created on the event loop; the scheduler thread pushes events with `call_soon_threadsafe`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.collected: list[TextChunk] | None = None  # see collect()
        self.cancelled = False  # set on the loop, read by the scheduler thread (a plain bool is atomic)

    def cancel(self) -> None:
        self.cancelled = True

    def collect(self) -> list[TextChunk]:
        """From now on, gather the request's chunks of text in the list returned, in order, rather than
        queueing them one by one: a reader that wants only the whole text (a non-streamed request)
        then reads its end alone, whether its chunks come step by step or all together
        (`final_only`). The other events still come through next_event; chunks queued before this
        call are there too. Call it on the handle's event loop."""
        self.collected = []
        return self.collected

    async def next_event(self) -> Event:
        return await self.events.get()


# --- Refusals, raised by submit() on the caller's side -------------------------------------------

class EngineUnavailable(Exception):
    """The engine takes no request now: `reason` is `loading`, `draining` or `unhealthy`."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"the server is {reason}")


class QueueFull(Exception):
    """Every cache row is busy and the waiting queue is full."""


class EngineLike(Protocol):
    """What the HTTP layer needs from an engine; tests substitute a fake one."""

    tokenizer: CharTokenizer

    @property
    def ready(self) -> bool: ...
    @property
    def draining(self) -> bool: ...
    @property
    def restarting(self) -> bool: ...
    @property
    def alive(self) -> bool: ...
    @property
    def queue_size(self) -> int: ...
    @property
    def running_rows(self) -> int: ...

    def start(self) -> None: ...
    def submit(self, request: GenerationRequest) -> RequestHandle: ...
    async def drain(self, timeout_s: float) -> None: ...
    def shutdown(self) -> None: ...
    def model_card(self) -> dict[str, Any]: ...


# --- The engine ---------------------------------------------------------------------------------

@dataclass(eq=False, slots=True)
class _Work:
    """One request inside the engine."""

    request: GenerationRequest
    handle: Cancellable
    submitted_at: float
    seq: Sequence | None = None
    row: int | None = None
    admitted_at: float = 0.0
    first_token_at: float | None = None
    prompt_scores: tuple[TokenLogprob | None, ...] | None = None
    outbox: list[Event] = field(default_factory=list)  # events of this iteration, not yet delivered
    ended: bool = False  # its last event (Finished or Failed) is in the outbox or delivered
    released: bool = False  # its row and its place in flight are given back

    def emit(self, event: Event) -> None:
        self.outbox.append(event)
        self.ended = self.ended or isinstance(event, ENDINGS)


Deliveries = list[tuple[Any, list[Event]]]  # (a request's handle, its new events), for many requests


class Admission:
    """Readiness and draining, as every engine reports them, and the refusals they imply."""

    _ready = False
    _draining = False
    _restarting = False  # a dead engine is being replaced (service/engine_process.py)

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    @property
    def restarting(self) -> bool:
        return self._restarting

    @property
    def ready(self) -> bool:
        return self._ready and not self._draining and self.alive

    @property
    def draining(self) -> bool:
        return self._draining

    def check_accepting(self) -> None:
        """Raise EngineUnavailable unless a new request may be queued now."""
        if self._draining:
            raise EngineUnavailable("draining")
        if not self.alive:
            raise EngineUnavailable("unhealthy")
        if not self._ready:
            raise EngineUnavailable("restarting" if self._restarting else "loading")


_row_of = attrgetter("row")


class Engine(Admission):
    """The scheduler. By default it hands events to the asyncio loops that submitted the requests;
    `on_events`, when given, receives every iteration's deliveries instead (possibly none), on the
    scheduler thread: service/engine_process.py forwards them to another process."""

    def __init__(self, model: GPT, tokenizer: CharTokenizer, *, max_batch_size: int = 32,
                 max_queue: int = 64, queue_timeout_s: float = 30.0,
                 checkpoint_config: dict[str, Any] | None = None, checkpoint_path: Path | None = None,
                 warmup: bool = True, compile: bool = False, kv_cache_dtype: torch.dtype | None = None,
                 on_events: Callable[[Deliveries], None] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.checkpoint_config = checkpoint_config or {}
        self.checkpoint_path = checkpoint_path
        self.warmup = warmup
        self.on_events = on_events or to_event_loops
        weights = next(model.parameters())
        self.device, self.dtype = weights.device, weights.dtype
        self.kv_cache_dtype = kv_cache_dtype or self.dtype
        # The whole KV memory is allocated here, once: load never grows it.
        self.cache = KVCache(model.config, max_batch_size, device=self.device, dtype=self.kv_cache_dtype)
        if compile:  # compiled (CUDA graphs captured) at warm-up
            compile_decode(model, self.cache)

        self._lock = threading.Condition()
        self._waiting: collections.deque[_Work] = collections.deque()  # guarded by _lock
        self._in_flight = 0  # submitted and not yet ended; guarded by _lock
        self._abort: Failed | None = None  # set by drain(): fail everything still in flight
        self._stopping = False
        # Owned by the scheduler thread alone:
        self._running: list[_Work] = []
        self._free_rows = list(range(max_batch_size - 1, -1, -1))  # pop() hands out row 0 first

        self.decode_steps = 0  # batched decode steps run so far (tests count them)
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None

    @classmethod
    def from_settings(cls, settings: Any, **options: Any) -> Engine:
        """Load the checkpoint that `settings` (a service.settings.Settings) names. Raises
        gpt.CheckpointError for a bad checkpoint, ValueError for a device this machine lacks."""
        if settings.threads:
            torch.set_num_threads(settings.threads)
        device = pick_device(settings.device)
        dtype = pick_dtype(device, settings.dtype)
        if device.type == "cpu" and dtype == torch.bfloat16 and not has_bfloat16_instructions():
            logger.warning("bfloat16 on a CPU without bfloat16 instructions (%s): every product converts to "
                           "float32 and back; --dtype float32 is likely faster here",
                           torch.backends.cpu.get_cpu_capability())
        kv_cache_dtype = dtype if settings.kv_cache_dtype == "auto" else DTYPES[settings.kv_cache_dtype]
        if kv_cache_dtype != dtype and not (device.type == "cpu" and settings.compile):
            logger.warning("a %s KV cache for %s weights, not in the compiled CPU step: each step converts "
                           "the keys and values it reads into a copy, which costs more time than the "
                           "narrower cache saves (it still takes less memory)",
                           str(kv_cache_dtype).removeprefix("torch."), str(dtype).removeprefix("torch."))
        options = {"max_batch_size": settings.max_batch_size, "max_queue": settings.max_queue,
                   "queue_timeout_s": settings.queue_timeout_s, "compile": settings.compile,
                   "kv_cache_dtype": kv_cache_dtype, **options}
        with one_cpu_thread():  # this thread only loads; the scheduler thread runs the model
            checkpoint = load_checkpoint(settings.checkpoint, device=device, dtype=dtype)
            return cls(checkpoint.model, checkpoint.tokenizer, checkpoint_config=checkpoint.config,
                       checkpoint_path=Path(settings.checkpoint), **options)

    # -- State, readable from any thread --

    @property
    def alive(self) -> bool:
        return self._thread_error is None and (self._thread is None or self._thread.is_alive()
                                               or self._stopping)

    @property
    def queue_size(self) -> int:
        return len(self._waiting)

    @property
    def running_rows(self) -> int:
        return len(self._running)

    def model_card(self) -> dict[str, Any]:
        config = self.model.config
        return {
            "preset": self.checkpoint_config.get("preset"),
            "parameters": self.model.num_parameters(),
            "layers": config.n_layer,
            "heads": config.n_head,
            "width": config.n_embd,
            "context": config.block_size,
            "vocab_size": self.tokenizer.vocab_size,
            "vocab": self.tokenizer.chars,
            "device": str(self.device),
            "cpu_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # ATen's kernels: AVX2, AVX512, ...
            "dtype": str(self.dtype).removeprefix("torch."),
            "kv_cache_dtype": str(self.kv_cache_dtype).removeprefix("torch."),
            "checkpoint": str(self.checkpoint_path) if self.checkpoint_path else None,
            "weights_sha256": self.checkpoint_config.get("weights_sha256"),
            "training": self.checkpoint_config.get("training", {}),
            "empty_prompt": "generation starts from token id 0, the newline character",
        }

    # -- Lifecycle --

    def start(self) -> None:
        """Start the scheduler thread; it warms up at full batch, then turns `ready`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="caesar-scheduler", daemon=True)
            self._thread.start()

    def submit(self, request: GenerationRequest, handle: Cancellable | None = None) -> Any:
        """Queue a request; return its handle (by default a RequestHandle on the calling event
        loop). Raises EngineUnavailable or QueueFull at once."""
        self.check_accepting()
        work = _Work(request, handle or RequestHandle(), time.perf_counter())
        with self._lock:
            if self._in_flight >= self.max_batch_size + self.max_queue:
                raise QueueFull()
            self._in_flight += 1
            self._waiting.append(work)
            self._lock.notify()
        return work.handle

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests; let those in flight finish for up to `timeout_s`, then fail the rest
        with a `shutdown` error so their clients hear why."""
        self._draining = True
        await drain_in_flight(lambda: self._in_flight, self.abort, lambda: self.alive, timeout_s)

    def abort(self, failure: Failed) -> None:
        """End every request in flight with `failure`, at the scheduler's next iteration."""
        with self._lock:
            self._abort = failure
            self._lock.notify()

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- The scheduler thread --

    @torch.inference_mode()  # for good: gpt.generate.step_tokens would enter it at every step
    def _run(self) -> None:
        try:
            if self.warmup:
                self._warm_up()
            self._ready = True
            logger.info("engine ready: %d rows on %s (%s, KV cache %s)", self.max_batch_size, self.device,
                        self.dtype, self.kv_cache_dtype)
            while True:
                with self._lock:
                    while not (self._waiting or self._running or self._stopping or self._abort):
                        self._lock.wait()
                    if self._stopping:
                        return
                    abort, self._abort = self._abort, None
                    admitted = self._take_admissions()
                if abort is not None:
                    self._fail_all(abort, admitted)
                    continue
                for work in [w for w in self._running if w.handle.cancelled]:
                    self._release(work)  # the client is gone: nobody to tell
                if admitted:
                    self._start(admitted)
                    self._settle(admitted)  # first characters go out before the decode step
                self._decode_step()
                self._settle(self._running)
        except BaseException as error:  # a bug here must show in /health, and must not hang clients
            logger.exception("the scheduler thread died")
            self._thread_error = error
            with self._lock:
                orphans = list(self._waiting) + self._running
            self.on_events([(work.handle, [Failed("generation", "the generation engine stopped")])
                            for work in orphans])
            raise

    def _take_admissions(self) -> list[_Work]:
        """Under the lock: settle the waiting queue's cancelled and timed-out requests, and take as
        many of the rest as there will be free rows."""
        now = time.perf_counter()
        for work in list(self._waiting):
            if work.handle.cancelled:
                self._waiting.remove(work)
                self._in_flight -= 1
            elif now - work.submitted_at > self.queue_timeout_s:
                self._waiting.remove(work)
                self._in_flight -= 1
                message = f"no free row within {self.queue_timeout_s:g} s; try again later"
                self.on_events([(work.handle, [Failed("queue_timeout", message)])])
        if not self._waiting:
            return []
        free = len(self._free_rows) + sum(1 for w in self._running if w.handle.cancelled)
        admitted = []
        while self._waiting and len(admitted) < free:
            admitted.append(self._waiting.popleft())
        return admitted

    def _start(self, works: list[_Work]) -> None:
        """Give admitted requests rows: prefill their prompts together and sample their first tokens.
        Whatever one request causes to fail ends that request alone."""
        starting = []
        for work in works:
            request = work.request
            work.admitted_at = time.perf_counter()
            work.emit(Admitted(work.admitted_at - work.submitted_at))
            try:
                work.seq = Sequence(request.prompt_ids, request.max_new_tokens, request.params,
                                    self.tokenizer.decode, self.tokenizer.vocab_size,
                                    self.model.config.block_size, request.stop, request.min_tokens,
                                    request.logprobs, request.ranked)
                if request.prompt_logprobs is not None:
                    work.prompt_scores = self._score_prompt(request.prompt_ids, request.prompt_logprobs)
            except Exception as error:
                logger.exception("a request could not start")
                work.emit(failure(error))
                continue
            if work.seq.finish_reason:  # max_new_tokens == 0: nothing to generate
                work.emit(self._finished(work))
                continue
            work.row = work.seq.row = self._free_rows.pop()
            self._running.append(work)
            starting.append(work)
        if starting:
            # In row order, a decode step's logits come out in the order of its rows (step_tokens
            # sorts rows so that attention views the cache): no reordering, step after step.
            self._running.sort(key=_row_of)
            self._run_model(starting, "prefill")

    def _score_prompt(self, prompt_ids: list[int], top_n: int) -> tuple[TokenLogprob | None, ...]:
        if not prompt_ids:
            return ()
        scores = score(self.model, prompt_ids, top_n)
        return (None, *(TokenLogprob(token, logprob, tuple(top)) for token, logprob, top in scores))

    def _decode_step(self) -> None:
        """One batched decode step over every running row."""
        batch = [w for w in self._running if not w.ended]
        if not batch:
            return
        self.decode_steps += 1
        self._run_model(batch, "decode step")

    def _run_model(self, works: list[_Work], what: str) -> None:
        """Sample these requests' next tokens in one batched step and hand each its new text. If the
        step raises, it runs again for each request alone (the draws are a function of seed and
        position, so every other request gets exactly what it would have): only the requests that
        fail alone fail. A failure of every row alone belongs to no request (the model, out of
        memory): those rows fail, and the engine goes on."""
        seqs = [w.seq for w in works]
        try:
            sampled = step_tokens(self.model, self.cache, seqs)
        except Exception as error:
            if len(works) == 1:
                logger.exception("%s failed for 1 row", what)
                works[0].emit(failure(error))
                return
            logger.exception("%s failed for %d rows; running each row alone", what, len(works))
            failures = 0
            for work in works:
                try:
                    alone = step_tokens(self.model, self.cache, [work.seq])
                except Exception as alone_error:
                    failures += 1
                    work.emit(failure(alone_error))
                else:
                    self._accept(work, alone, 0, time.perf_counter())
            if failures == len(works):
                logger.error("%s failed for each of its %d rows alone too: not one request's doing",
                             what, len(works))
            elif failures:
                logger.warning("%s: %d of %d rows failed alone and were ended", what, failures, len(works))
            return
        now = time.perf_counter()
        for i, work in enumerate(works):
            self._accept(work, sampled, i, now)

    def _accept(self, work: _Work, sampled: Sampled, i: int, now: float) -> None:
        """Row i of `sampled` is this request's next token: accept it and emit what it releases."""
        seq, token, logprob = work.seq, sampled.tokens[i], sampled.logprobs[i]
        try:
            text = seq.accept(token, logprob)
        except Exception as error:
            logger.exception("a request failed accepting its token")
            work.emit(failure(error))
            return
        if work.first_token_at is None:
            work.first_token_at = now
        if seq.logprobs is not None:  # the step's alternatives, as many as this request asked for
            top = tuple(sampled.top[i][:seq.logprobs]) if seq.logprobs else ()
            work.emit(TextChunk(text, now, TokenLogprob(token, logprob, top)))
        elif text:
            work.outbox.append(TextChunk(text, now))  # emit() without its check: a chunk ends nothing
        if seq.finish_reason:
            work.emit(self._finished(work))

    def _finished(self, work: _Work) -> Finished:
        seq, now = work.seq, time.perf_counter()
        return Finished(
            finish_reason=seq.finish_reason,
            generated_tokens=seq.generated,
            seed=seq.seed,
            input_length=seq.prompt_length,
            truncated=seq.prompt_truncated,
            last_token_id=seq.tokens[-1] if seq.generated else None,
            queue_s=work.admitted_at - work.submitted_at,
            time_to_first_token_s=(work.first_token_at or now) - work.submitted_at,
            total_s=now - work.submitted_at,
            cumulative_logprob=seq.cumulative_logprob,
            prompt_logprobs=work.prompt_scores,
        )

    def _settle(self, works: list[_Work]) -> None:
        """Free the rows of requests that ended, then hand every request its events of this
        iteration (a final-only request: all its events, once it has ended), in one call of `on_events`."""
        deliveries, ended = [], []
        for work in works:
            if work.outbox and (work.ended or not work.request.final_only):
                deliveries.append((work.handle, work.outbox))
                work.outbox = []
            if work.ended:
                ended.append(work)
        for work in ended:  # its row is free before its client hears that it ended
            self._release(work)
        self.on_events(deliveries)

    def _release(self, work: _Work) -> None:
        """Give back an ended or cancelled request's row and its place in flight (once)."""
        if work.released:
            return
        work.released = True
        if work in self._running:
            self._running.remove(work)
        if work.row is not None:
            self.cache.free(work.row)
            self._free_rows.append(work.row)
            work.row = None
        with self._lock:
            self._in_flight -= 1

    def _fail_all(self, failure: Failed, admitted: list[_Work]) -> None:
        """End every request in flight with `failure` (the drain ran out of time)."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        everyone = admitted + waiting + self._running
        for work in everyone:
            work.emit(failure)
        self._settle(everyone)

    def _warm_up(self) -> None:
        """Run the largest shapes the engine will see before serving: a prefill of a whole context
        (row 0), then one decode step over every row that attends over the whole context length;
        then decode steps of one row and of two, which a compiled float32 step on the CPU has graphs
        of their own for (one row; a few rows; many rows, which the step over every row compiles; a
        narrower dtype runs the many-rows graph alone); then, with both kinds compiled, where the
        few-rows one should stop is measured."""
        started = time.perf_counter()
        context = self.model.config.block_size
        greedy = SamplingParams(temperature=0.0)
        prompts = [[0] * (context - 1)] + [[0]] * (self.max_batch_size - 1)
        seqs = [Sequence(prompt, 2, greedy, self.tokenizer.decode, self.tokenizer.vocab_size, context)
                for prompt in prompts]
        start_rows(self.model, self.cache, seqs, list(range(self.max_batch_size)))
        advance(self.model, self.cache, seqs)
        advance(self.model, self.cache, seqs[1:2])
        advance(self.model, self.cache, seqs[1:3])
        for row in range(self.max_batch_size):
            self.cache.free(row)
        step = self.cache.compiled_step
        if isinstance(step, CompiledRowsStep) and 0 < step.max_few_rows < self.max_batch_size:
            # Both graphs are compiled now (the step over every row ran the many-rows one): where one
            # stops beating the other is measured on this CPU, for these weights.
            boundary = step.choose_boundary(self.max_batch_size, position=context // 2)
            logger.info("compiled step: the packed-GEMM graph takes up to %d rows", boundary)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        logger.info("warm-up at batch %d, context %d: %.2f s", self.max_batch_size, context,
                    time.perf_counter() - started)


def failure(error: BaseException) -> Failed:
    """A request's `generation` failure, naming the exception's type (its text stays in the log)."""
    return Failed("generation", f"generation failed: {type(error).__name__}")


async def drain_in_flight(in_flight: Callable[[], int], abort: Callable[[Failed], None],
                          alive: Callable[[], bool], timeout_s: float) -> None:
    """Let the requests in flight finish for up to `timeout_s`, then end the rest with a `shutdown`
    failure (so their clients hear why) and wait until they have heard it."""
    deadline = time.monotonic() + timeout_s
    while in_flight() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if in_flight():
        logger.warning("drain: %d requests still running after %.1f s; ending them", in_flight(), timeout_s)
        abort(Failed("shutdown", "the server shut down before this request finished"))
        while in_flight() and alive():
            await asyncio.sleep(0.02)


def to_event_loops(deliveries: Deliveries) -> None:
    """Hand RequestHandles their events: one wake-up per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, Deliveries] = {}
    for handle, events in deliveries:
        by_loop.setdefault(handle.loop, []).append((handle, events))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_events, items)
        except RuntimeError:  # the loop closed: nobody is listening any more
            pass


def _put_events(deliveries: Deliveries) -> None:
    """On the handles' event loop: queue each handle's events, or gather its chunks where it collects."""
    for handle, events in deliveries:
        collected = handle.collected
        for event in events:
            if collected is not None and type(event) is TextChunk:
                collected.append(event)
            else:
                handle.events.put_nowait(event)
