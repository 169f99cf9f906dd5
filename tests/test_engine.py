"""The engine in-process, on the tiny random model: continuous batching keeps each request's text
what it would be alone, cancelled rows are freed within two decode steps, the queue is bounded,
and drain ends what cannot finish (faults: tests/test_engine_faults.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
import torch

from gpt import GPT, CharTokenizer, SamplingParams, generate
from service.engine import (
    Admitted,
    Engine,
    EngineUnavailable,
    Failed,
    Finished,
    GenerationRequest,
    QueueFull,
    RequestHandle,
    TextChunk,
)
from tests.conftest import REPO, MakeEngine


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout=60))


async def outcome(handle: RequestHandle) -> tuple[str, Finished | Failed]:
    text = ""
    while True:
        event = await handle.next_event()
        if isinstance(event, TextChunk):
            text += event.text
        elif isinstance(event, Finished | Failed):
            return text, event


def request(tokenizer: CharTokenizer, prompt: str = "CAESAR:", max_new_tokens: int = 40,
            **params: Any) -> GenerationRequest:
    return GenerationRequest(tokenizer.encode(prompt), max_new_tokens, SamplingParams(**params))


def test_same_seed_same_text_alone_and_in_a_full_batch(make_engine: MakeEngine, tiny_model: GPT,
                                                       tokenizer: CharTokenizer) -> None:
    engine = make_engine(max_batch_size=9)
    mine = request(tokenizer, "BRUTUS:", 80, temperature=0.9, top_k=30, seed=7)

    async def alone() -> str:
        return (await outcome(engine.submit(mine)))[0]

    async def among_others() -> str:
        others = [engine.submit(request(tokenizer, "O" * n, 60 + 7 * n, seed=n)) for n in range(4)]
        handle = engine.submit(mine)
        others += [engine.submit(request(tokenizer, "Rome" * n, 90, top_p=0.8, seed=100 + n))
                   for n in range(4)]
        results = await asyncio.gather(outcome(handle), *(outcome(h) for h in others))
        assert all(isinstance(end, Finished) for _, end in results)
        return results[0][0]

    text = run(alone())
    assert len(text) == 80
    assert run(among_others()) == text
    # ...and it is what the library's own streaming generator writes for that seed.
    chunks = generate(tiny_model, mine.prompt_ids, tokenizer.decode, 80, mine.params)
    assert "".join(chunk.text for chunk in chunks) == text


def test_compiled_decode_on_the_cpu_writes_the_same_text(make_engine: MakeEngine, tiny_model: GPT,
                                                         tokenizer: CharTokenizer,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """--compile on the CPU: the warm-up compiles the step (inductor: one row, a few rows, and here,
    with the default boundary at 2 rows, the 4-row step's graph), measures where the few-rows graph
    should stop, then requests alone and together get the text of the uncompiled library path."""
    from gpt.generate import CompiledRowsStep
    monkeypatch.setattr(sys.modules["gpt.generate"], "COMPILED_CPU_MAX_ROWS", 2)
    with caplog.at_level("INFO", logger="service.engine"):
        engine = make_engine(compile=True, warm_up_s=600)
    step = engine.cache.compiled_step
    assert isinstance(step, CompiledRowsStep) and step.max_few_rows in (1, 2, 4)
    assert f"the packed-GEMM graph takes up to {step.max_few_rows} rows" in caplog.text
    requests = [request(tokenizer, "BRUTUS:", 50, temperature=0.9, top_k=30, seed=7),
                request(tokenizer, "O" * 9, 70, temperature=0), request(tokenizer, "Rome", 30, seed=3)]

    async def alone() -> str:
        return (await outcome(engine.submit(requests[0])))[0]

    async def together() -> list[str]:
        results = await asyncio.gather(*(outcome(engine.submit(r)) for r in requests))
        assert all(isinstance(end, Finished) for _, end in results)
        return [text for text, _ in results]

    expected = ["".join(c.text for c in generate(tiny_model, r.prompt_ids, tokenizer.decode, r.max_new_tokens,
                                                 r.params)) for r in requests]
    assert run(alone()) == expected[0]
    assert run(together()) == expected


def test_cancelled_row_is_freed_within_two_decode_steps(make_engine: MakeEngine,
                                                        tokenizer: CharTokenizer) -> None:
    engine = make_engine()

    async def scenario() -> int:
        handle = engine.submit(request(tokenizer, max_new_tokens=10_000))
        while not isinstance(await handle.next_event(), TextChunk):
            pass
        assert engine.running_rows == 1
        steps_at_cancel = engine.decode_steps
        handle.cancel()
        while engine.running_rows:
            await asyncio.sleep(0.001)
        return engine.decode_steps - steps_at_cancel

    assert run(scenario()) <= 2


def test_full_queue_refuses_at_once_and_waiting_times_out(make_engine: MakeEngine,
                                                          tokenizer: CharTokenizer) -> None:
    engine = make_engine(max_batch_size=1, max_queue=1, queue_timeout_s=0.2)

    async def scenario() -> tuple[str, Failed | Finished]:
        running = engine.submit(request(tokenizer, max_new_tokens=100_000))
        waiting = engine.submit(request(tokenizer))
        with pytest.raises(QueueFull):
            engine.submit(request(tokenizer))
        _, waited = await outcome(waiting)
        running.cancel()
        return waited

    waited = run(scenario())
    assert isinstance(waited, Failed) and waited.error_type == "queue_timeout"


def test_zero_new_tokens_stop_strings_and_long_prompts(make_engine: MakeEngine,
                                                       tokenizer: CharTokenizer) -> None:
    engine = make_engine()

    async def scenario() -> list[tuple[str, Finished | Failed]]:
        greedy = request(tokenizer, max_new_tokens=40, temperature=0.0)
        text, _ = await outcome(engine.submit(greedy))
        stop = text[20:23]
        stopped = GenerationRequest(greedy.prompt_ids, 40, greedy.params, (stop,))
        long_prompt = request(tokenizer, "Beware the ides of March. " * 10, max_new_tokens=5)
        return [(text, _), *await asyncio.gather(
            outcome(engine.submit(request(tokenizer, max_new_tokens=0))),
            outcome(engine.submit(stopped)),
            outcome(engine.submit(long_prompt)))]

    (greedy_text, _), (empty, zero), (stopped_text, stopped), (_, long_end) = run(scenario())
    assert empty == "" and zero.finish_reason == "length" and zero.generated_tokens == 0
    assert stopped.finish_reason == "stop"
    assert stopped_text == greedy_text[:greedy_text.index(greedy_text[20:23])]
    assert long_end.truncated and long_end.input_length == 260 and long_end.generated_tokens == 5


def test_a_ranked_request_sums_its_tokens_log_probabilities(make_engine: MakeEngine,
                                                            tokenizer: CharTokenizer) -> None:
    """best_of ranks rows by Finished.cumulative_logprob: a ranked row has the sum of the per-token
    log-probabilities that the same request reports with logprobs; a row that asked for neither
    (whose steps compute no log-probabilities) has 0.0 and the same text."""
    engine = make_engine()
    plain = request(tokenizer, "BRUTUS:", 30, temperature=0.9, seed=11)
    ranked = GenerationRequest(plain.prompt_ids, 30, plain.params, ranked=True)
    reported = GenerationRequest(plain.prompt_ids, 30, plain.params, logprobs=0)

    async def tokens(handle: RequestHandle) -> tuple[list[TextChunk], Finished]:
        chunks = []
        while not isinstance(event := await handle.next_event(), Finished | Failed):
            if isinstance(event, TextChunk):
                chunks.append(event)
        return chunks, event

    async def scenario() -> list[tuple[list[TextChunk], Finished]]:
        alone = [await tokens(engine.submit(r)) for r in (plain, ranked, reported)]
        together = await asyncio.gather(*(tokens(engine.submit(r)) for r in (plain, ranked)))
        return alone + list(together)

    (plain_chunks, plain_end), (ranked_chunks, ranked_end), (reported_chunks, reported_end), \
        (_, plain_beside_ranked), (_, ranked_beside_plain) = run(scenario())
    assert "".join(c.text for c in plain_chunks) == "".join(c.text for c in ranked_chunks) \
        == "".join(c.text for c in reported_chunks)
    per_token = sum(c.token.logprob for c in reported_chunks)
    assert per_token < 0
    assert ranked_end.cumulative_logprob == pytest.approx(per_token, abs=1e-4)
    assert ranked_beside_plain.cumulative_logprob == pytest.approx(per_token, abs=1e-4)
    assert plain_end.cumulative_logprob == plain_beside_ranked.cumulative_logprob == 0.0


def test_a_collecting_handle_wakes_its_reader_for_the_end_alone(make_engine: MakeEngine,
                                                                 tokenizer: CharTokenizer) -> None:
    """RequestHandle.collect (non-streamed requests): after it, the chunks gather in its list, in
    order, and next_event gives the other events only; chunks queued before it stay in the queue."""
    engine = make_engine()
    mine = request(tokenizer, "BRUTUS:", 60, temperature=0.9, seed=3)

    async def collecting() -> tuple[str, list[type], int]:
        handle = engine.submit(mine)
        assert isinstance(await handle.next_event(), Admitted)
        queued = handle.events.qsize()  # chunks delivered before collect(): as many steps as ran by now
        collected = handle.collect()
        read, woken_by = "", []
        while not isinstance(event := await handle.next_event(), Finished | Failed):
            read += event.text
            woken_by.append(type(event))
        woken_by.append(type(event))
        assert woken_by == [TextChunk] * queued + [Finished]
        return read + "".join(chunk.text for chunk in collected), woken_by, len(collected)

    async def read_event_by_event() -> str:
        return (await outcome(engine.submit(mine)))[0]

    text, woken_by, gathered = run(collecting())
    assert gathered == 60 - (len(woken_by) - 1) and gathered > 0  # every chunk after collect() is gathered
    assert text == run(read_event_by_event()) and len(text) == 60


class Recorded:
    """A handle of the engine's own kind (no event loop): the deliveries it got, each a list of events."""

    def __init__(self) -> None:
        self.cancelled = False
        self.deliveries: list[list[Any]] = []


def test_a_final_only_request_gets_all_its_events_in_one_delivery(make_engine: MakeEngine,
                                                                  tokenizer: CharTokenizer) -> None:
    """A non-streamed request (final_only) is handed nothing while it runs, then everything at once,
    with its end: one delivery instead of one a step, and the text a streamed twin gets step by step."""
    ended = threading.Event()
    handles: list[Recorded] = []

    def record(deliveries: Any) -> None:
        for handle, events in deliveries:
            handle.deliveries.append(list(events))
        if handles and all(h.deliveries and isinstance(h.deliveries[-1][-1], Finished | Failed)
                           for h in handles):
            ended.set()

    engine = make_engine(on_events=record)
    streamed = request(tokenizer, "BRUTUS:", 50, temperature=0.9, seed=11)
    final_only = dataclasses.replace(streamed, final_only=True)
    handles += [Recorded(), Recorded()]
    for req, handle in zip((streamed, final_only), handles, strict=True):
        engine.submit(req, handle)
    assert ended.wait(30)
    step_by_step, at_once = (h.deliveries for h in handles)
    assert len(step_by_step) > 40 and len(at_once) == 1
    events = at_once[0]
    assert isinstance(events[0], Admitted) and isinstance(events[-1], Finished)
    assert all(type(event) is TextChunk for event in events[1:-1])

    def text(deliveries: list[list[Any]]) -> str:
        return "".join(e.text for events in deliveries for e in events if type(e) is TextChunk)

    assert text(at_once) == text(step_by_step) and len(text(at_once)) == 50
    assert events[-1].generated_tokens == 50


def test_drain_lets_short_requests_finish_and_ends_the_rest(make_engine: MakeEngine,
                                                            tokenizer: CharTokenizer) -> None:
    engine = make_engine()
    cache_buffers = [t.data_ptr() for t in engine.cache.k + engine.cache.v]

    async def scenario() -> tuple[Finished | Failed, Finished | Failed]:
        short = engine.submit(request(tokenizer, max_new_tokens=5))
        long = engine.submit(request(tokenizer, max_new_tokens=1_000_000))
        short_outcome = asyncio.ensure_future(outcome(short))
        long_outcome = asyncio.ensure_future(outcome(long))
        await engine.drain(timeout_s=0.3)
        with pytest.raises(EngineUnavailable):
            engine.submit(request(tokenizer))
        return (await short_outcome)[1], (await long_outcome)[1]

    short_end, long_end = run(scenario())
    assert isinstance(short_end, Finished)
    assert isinstance(long_end, Failed) and long_end.error_type == "shutdown"
    assert not engine.ready and engine.running_rows == 0 and engine.queue_size == 0
    # The KV cache is the one allocated at start: serving never reallocates it.
    assert [t.data_ptr() for t in engine.cache.k + engine.cache.v] == cache_buffers


# Run in a fresh interpreter: the main thread's OpenMP team, once it has one, lasts as long as the process.
LOADING_THREAD_SCRIPT = """
import os, sys
import torch
from gpt import load_checkpoint
from service.engine import Engine
from service.settings import Settings

def os_threads():
    return len(os.listdir("/proc/self/task"))

torch.set_num_threads(2)
before = os_threads()
engine = Engine.from_settings(Settings(checkpoint=sys.argv[1], threads=2, device="cpu"), warmup=False)
after_engine = os_threads()
load_checkpoint(sys.argv[1])  # the same load, unguarded: this thread's first parallel region
print(before, after_engine, os_threads(), torch.get_num_threads())
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc/self/task (Linux)")
def test_loading_gives_the_loading_thread_no_openmp_team() -> None:
    """The scheduler thread runs the model; a team of OpenMP workers on the thread that loaded it too
    slows every parallel region of the scheduler's (gpt.device.one_cpu_thread says why). The shipped
    checkpoint: the tiny model's tensors are too small for a parallel region."""
    checkpoint = REPO / "checkpoints" / "caesar"
    result = subprocess.run([sys.executable, "-c", LOADING_THREAD_SCRIPT, str(checkpoint)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    before, after_engine, after_unguarded_load, threads = map(int, result.stdout.split())
    assert after_engine == before  # Engine.from_settings: no worker started for this thread
    assert after_unguarded_load > before  # the probe sees a team when there is one
    assert threads == 2  # the setting stands for the scheduler thread


@pytest.mark.parametrize("instructions", [False, True])
def test_bfloat16_on_a_cpu_without_its_instructions_is_warned_about(
        tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        instructions: bool) -> None:
    """--dtype bfloat16 on the CPU: without AVX512-BF16 or AMX every product converts to float32 and
    back, and the compiled bfloat16 step served fewer characters than float32 (docs/benchmarks.md)."""
    import service.engine
    from service.settings import Settings
    monkeypatch.setattr(service.engine, "has_bfloat16_instructions", lambda: instructions)
    for dtype in ("float32", "bfloat16"):
        engine = Engine.from_settings(Settings(checkpoint=tiny_checkpoint, device="cpu", dtype=dtype),
                                      warmup=False)
        assert engine.dtype == getattr(torch, dtype)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if instructions:
        assert warnings == []
    else:  # once: for bfloat16, not for float32
        assert len(warnings) == 1 and "without bfloat16 instructions" in warnings[0]
        assert "--dtype float32" in warnings[0]
