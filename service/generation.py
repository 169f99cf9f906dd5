"""What both APIs share between HTTP and the engine: turning validated requests into engine requests,
admission (every refusal is raised here, before any response starts), reading a request's events,
and noticing a client that left.

A client's request may take several rows of the engine (OpenAI's n, best_of and lists of prompts,
TGI's best_of): one GenerationRequest per row, as vLLM V1's frontend fans a parent request out into
child requests. The rows of one request are admitted together or not at all (a refusal of any
cancels those already queued), and a failure of any row, or the client leaving, cancels all of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from operator import sub
from typing import Annotated, TypeVar

from fastapi import Depends
from starlette.requests import Request
from starlette.types import Receive

from gpt import SamplingParams, UnknownCharacterError
from service import errors
from service.engine import (
    Admitted,
    EngineLike,
    EngineUnavailable,
    Failed,
    Finished,
    GenerationRequest,
    QueueFull,
    RequestHandle,
    TextChunk,
    TokenLogprob,
)
from service.errors import APIError
from service.metrics import ServiceMetrics
from service.settings import Settings

T = TypeVar("T")
SEED_MODULUS = 2**64


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was complete."""


@dataclass(frozen=True)
class Sampling:
    """The sampling fields of either API, before defaults."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    do_sample: bool | None = None
    min_p: float | None = None
    typical_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    greedy_by_default: bool = False  # TGI: greedy unless do_sample or a sampling setting asks otherwise


def sampling_params(sampling: Sampling, vocab_size: int | None = None) -> SamplingParams:
    if sampling.temperature is not None:
        temperature = sampling.temperature
    elif sampling.greedy_by_default and not sampling.do_sample and sampling.top_k is None \
            and sampling.top_p is None and sampling.typical_p is None and sampling.min_p is None:
        temperature = 0.0  # TGI: no sampling asked for, no sampling setting given -> greedy
    else:
        temperature = 1.0
    top_k = sampling.top_k
    if top_k is not None and vocab_size is not None:
        top_k = min(top_k, vocab_size)  # more than the vocabulary is all of it; keeps the number small
    return SamplingParams(
        temperature=temperature, top_k=top_k, top_p=sampling.top_p,
        repetition_penalty=sampling.repetition_penalty or 1.0, seed=sampling.seed,
        min_p=sampling.min_p or None, typical_p=sampling.typical_p,
        presence_penalty=sampling.presence_penalty or 0.0,
        frequency_penalty=sampling.frequency_penalty or 0.0, logit_bias=sampling.logit_bias)


def nth_sample(request: GenerationRequest, sample: int) -> GenerationRequest:
    """The request of a prompt's sample number `sample`: with a seed, sample i uses seed + i (so that
    the samples differ, and each is reproducible)."""
    seed = request.params.seed
    if sample == 0 or seed is None:
        return request
    params = dataclasses.replace(request.params, seed=(seed + sample) % SEED_MODULUS)
    return dataclasses.replace(request, params=params)


@dataclass
class Outcome:
    """All that one row produced: its text, its chunks (each with its token and log-probabilities
    when they were asked for) and how it finished."""

    text: str
    chunks: list[TextChunk]
    finished: Finished

    @property
    def tokens(self) -> list[TokenLogprob] | None:
        """One per generated token, when the engine reported them (the request asked for logprobs)."""
        tokens = [chunk.token for chunk in self.chunks if chunk.token is not None]
        if len(tokens) != self.finished.generated_tokens or any(c.token is None for c in self.chunks):
            return None
        return tokens

    @property
    def mean_logprob(self) -> float:
        return self.finished.cumulative_logprob / max(self.finished.generated_tokens, 1)


@dataclass
class Service:
    settings: Settings
    engine: EngineLike
    metrics: ServiceMetrics
    created: int = field(default_factory=lambda: int(time.time()))  # reported as the model's `created`

    def encode(self, prompt: str, param: str) -> list[int]:
        try:
            return self.engine.tokenizer.encode(prompt)
        except UnknownCharacterError as error:
            raise errors.invalid(f"{param}: {error}", param=param, code="unknown_characters") from None

    def check_max_new_tokens(self, value: int, param: str) -> int:
        if value > self.settings.max_new_tokens:
            raise errors.invalid(f"{param} must be <= {self.settings.max_new_tokens} on this server",
                                 param=param)
        return value

    def check_rows(self, rows: int, what: str, param: str) -> None:
        """A request of more rows than the server ever holds at once could never be admitted."""
        capacity = self.settings.max_batch_size + self.settings.max_queue
        if rows > capacity:
            raise errors.invalid(f"{what} takes {rows} rows; this server holds at most {capacity} "
                                 f"requests at once (max_batch_size + max_queue)", param=param)

    def logit_bias(self, bias: dict[str, float] | None, param: str) -> tuple[tuple[int, float], ...]:
        """OpenAI's logit_bias, keyed by character ids as /tokenize gives them."""
        vocab_size = self.engine.tokenizer.vocab_size
        unknown = [key for key in bias or {} if int(key) >= vocab_size]
        if unknown:
            raise errors.invalid(f"{param}: no character has the id {unknown[0]} (ids are 0 to "
                                 f"{vocab_size - 1}, as /tokenize gives them)", param=param)
        return tuple((int(key), value) for key, value in (bias or {}).items())

    def submit(self, request: GenerationRequest) -> RequestHandle:
        try:
            return self.engine.submit(request)
        except QueueFull:
            raise errors.queue_full() from None
        except EngineUnavailable as error:
            raise errors.unavailable(error.reason) from None

    def submit_all(self, requests: Sequence[GenerationRequest]) -> list[RequestHandle]:
        """Submit a request's rows, all or none: a refusal of one cancels those already queued."""
        handles: list[RequestHandle] = []
        try:
            for request in requests:
                handles.append(self.submit(request))
        except APIError:
            cancel_all(handles)
            raise
        return handles

    async def wait_for_admission(self, handles: Sequence[RequestHandle], timeout_s: float) -> None:
        """Wait until every row has a place in the batch, for at most `timeout_s` in all; raise a
        refusal if one gets one first (cancelling the others). A stream's response starts after this,
        so that every refusal that comes this early is a real status code; a stream still queued after
        `timeout_s` starts anyway and receives `: ping` comments while it waits."""
        deadline = time.monotonic() + timeout_s
        for handle in handles:
            try:
                event = await asyncio.wait_for(handle.next_event(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                return
            if isinstance(event, Failed):
                cancel_all(handles)
                raise failure_error(event)
            assert isinstance(event, Admitted), event  # always a request's first event

    async def steps(self, handle: RequestHandle) -> AsyncIterator[tuple[list[TextChunk], Finished | None]]:
        """A row's chunks as they come: (chunks, None) ... then (last chunks, Finished). Chunks
        already waiting come together, so the last ones arrive with the end of the request. A Failed
        event is raised as an APIError. Records the latency metrics."""
        chunks: list[TextChunk] = []
        last_time = None
        while True:
            if chunks and handle.events.empty():
                yield chunks, None
                chunks = []
            event = await handle.next_event()
            if isinstance(event, TextChunk):
                last_time = self._observe_latency(event, last_time)
                chunks.append(event)
            elif isinstance(event, Finished):
                self._observe_end(event)
                yield chunks, event
                return
            elif isinstance(event, Failed):
                if chunks:  # what was generated before the failure still reaches the client
                    yield chunks, None
                raise failure_error(event)

    async def merged_steps(self, handles: Sequence[RequestHandle]
                           ) -> AsyncIterator[tuple[int, list[TextChunk], Finished | None]]:
        """The steps of several rows, interleaved as they come: (row, chunks, finished). The first
        failure of any row is raised."""
        if len(handles) == 1:
            async for chunks, finished in self.steps(handles[0]):
                yield 0, chunks, finished
            return
        queue: asyncio.Queue[tuple[int, list[TextChunk], Finished | None, APIError | None]] = asyncio.Queue()

        async def pump(row: int, handle: RequestHandle) -> None:
            try:
                async for chunks, finished in self.steps(handle):
                    queue.put_nowait((row, chunks, finished, None))
            except APIError as error:
                queue.put_nowait((row, [], None, error))

        pumps = [asyncio.ensure_future(pump(row, handle)) for row, handle in enumerate(handles)]
        try:
            running = len(handles)
            while running:
                row, chunks, finished, error = await queue.get()
                if error is not None:
                    raise error
                if finished is not None:
                    running -= 1
                yield row, chunks, finished
        finally:
            for task in pumps:
                task.cancel()

    def _observe_latency(self, chunk: TextChunk, last_time: float | None) -> float:
        """Record the time since the chunk before (sampled at `last_time`, if any); return this one's."""
        if last_time is not None:
            self.metrics.inter_token_latency.observe(chunk.time - last_time)
        return chunk.time

    def _observe_end(self, finished: Finished) -> None:
        self.metrics.time_to_first_token.observe(finished.time_to_first_token_s)
        self.metrics.generated_tokens.inc(finished.generated_tokens)

    async def outcome(self, handle: RequestHandle) -> Outcome:
        """A row's whole output, for a non-streamed request: its chunks are gathered without waking
        this coroutine (RequestHandle.collect), which wakes for the end. A Failed event is raised as
        an APIError."""
        chunks: list[TextChunk] = []  # those queued before collecting began
        collected = handle.collect()
        while True:
            event = await handle.next_event()
            if isinstance(event, TextChunk):
                chunks.append(event)
            elif isinstance(event, Finished):
                chunks += collected
                times = [chunk.time for chunk in chunks]
                self.metrics.inter_token_latency.observe_many(map(sub, times[1:], times))
                self._observe_end(event)
                return Outcome("".join(chunk.text for chunk in chunks), chunks, event)
            elif isinstance(event, Failed):
                raise failure_error(event)

    async def complete(self, request: Request, handles: Sequence[RequestHandle]) -> list[Outcome]:
        """What each row produced, for a non-streamed request. The first failure of any row cancels the
        others and is raised; a client that leaves first cancels them all."""
        async def every_outcome() -> list[Outcome]:
            tasks = [asyncio.ensure_future(self.outcome(handle)) for handle in handles]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for task in tasks:
                    task.cancel()
                cancel_all(handles)
                raise

        return await self.until_disconnect(request.receive, handles, every_outcome())

    async def until_disconnect(self, receive: Receive, handles: Sequence[RequestHandle],
                               work: Awaitable[T]) -> T:
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_client_left(receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            cancel_all(handles)
            self.metrics.disconnects.inc()
            raise ClientDisconnected()
        finally:
            task.cancel()
            watcher.cancel()


def cancel_all(handles: Sequence[RequestHandle]) -> None:
    for handle in handles:
        handle.cancel()


async def get_service(request: Request) -> Service:
    # async: FastAPI runs a plain-function dependency on its thread pool, a hand-off per request
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def _client_left(receive: Receive) -> None:
    # The body has been read, so the next message on the channel is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


def failure_error(failure: Failed) -> APIError:
    if failure.error_type == "queue_timeout":
        return errors.queue_timeout(failure.message)
    if failure.error_type in ("shutdown", "engine_restart"):
        return APIError(503, failure.message, "unavailable", code=failure.error_type,
                        headers={"Retry-After": str(errors.RETRY_AFTER_UNAVAILABLE_S)})
    return APIError(500, failure.message, "generation", code="generation_failed")


def timings(finished: Finished) -> dict[str, float]:
    return {
        "queue_ms": round(finished.queue_s * 1000, 3),
        "time_to_first_token_ms": round(finished.time_to_first_token_s * 1000, 3),
        "total_ms": round(finished.total_s * 1000, 3),
        "tokens_per_s": round(finished.generated_tokens / max(finished.total_s, 1e-9), 2),
    }


def usage_counts(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def usage(finished: Finished) -> dict[str, int]:
    return usage_counts(finished.input_length, finished.generated_tokens)


def total_usage(prompt_tokens: int, finished: Sequence[Finished]) -> dict[str, int]:
    """Usage of a request of several rows: its prompts counted once each, every row's tokens."""
    return usage_counts(prompt_tokens, sum(f.generated_tokens for f in finished))


def prompt_scores(scores: Sequence[TokenLogprob | None] | None, prompt_ids: list[int]
                  ) -> Sequence[TokenLogprob | None]:
    """A prompt's scores, one per character: the engine's, or none at all where it has none."""
    if scores is None or len(scores) != len(prompt_ids):
        return (None,) * len(prompt_ids)
    return scores
