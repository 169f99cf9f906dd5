"""What both APIs share between HTTP and the engine: turning validated requests into engine requests,
admission (every refusal is raised here, before any response starts), reading a request's events,
and noticing a client that left."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
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
)
from service.errors import APIError
from service.metrics import ServiceMetrics
from service.settings import Settings

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was complete."""


@dataclass(frozen=True)
class Sampling:
    """The sampling fields common to both APIs, before defaults."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    do_sample: bool | None = None


def sampling_params(sampling: Sampling) -> SamplingParams:
    temperature = 1.0 if sampling.temperature is None else sampling.temperature
    if sampling.do_sample is False and sampling.temperature is None and sampling.top_k is None \
            and sampling.top_p is None:
        temperature = 0.0  # TGI: no sampling asked for, no sampling setting given -> greedy
    return SamplingParams(temperature=temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                          repetition_penalty=sampling.repetition_penalty or 1.0, seed=sampling.seed)


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

    def submit(self, request: GenerationRequest) -> RequestHandle:
        try:
            return self.engine.submit(request)
        except QueueFull:
            raise errors.queue_full() from None
        except EngineUnavailable as error:
            raise errors.unavailable(error.reason) from None

    async def wait_for_admission(self, handle: RequestHandle, timeout_s: float) -> None:
        """Wait until the request has a row, for at most `timeout_s`; raise its refusal if it gets
        one first. A stream's response starts after this, so that every refusal that comes this
        early is a real status code; a stream still queued after `timeout_s` starts anyway and
        receives `: ping` comments while it waits."""
        try:
            event = await asyncio.wait_for(handle.next_event(), timeout_s)
        except TimeoutError:
            return
        if isinstance(event, Failed):
            raise failure_error(event)
        assert isinstance(event, Admitted), event  # always a request's first event

    async def steps(self, handle: RequestHandle) -> AsyncIterator[tuple[str, Finished | None]]:
        """The request's text as it comes, in pieces: (new text, None) ... then (last text, Finished).
        Text already waiting is merged into one piece, so the last characters arrive together with
        the end of the request. A Failed event is raised as an APIError. Records the latency metrics."""
        text, last_time = "", None
        while True:
            if text and handle.events.empty():
                yield text, None
                text = ""
            event = await handle.next_event()
            if isinstance(event, TextChunk):
                if last_time is not None:
                    self.metrics.inter_token_latency.observe(event.time - last_time)
                last_time = event.time
                text += event.text
            elif isinstance(event, Finished):
                self.metrics.time_to_first_token.observe(event.time_to_first_token_s)
                self.metrics.generated_tokens.inc(event.generated_tokens)
                yield text, event
                return
            elif isinstance(event, Failed):
                if text:  # what was generated before the failure still reaches the client
                    yield text, None
                raise failure_error(event)

    async def complete(self, request: Request, handle: RequestHandle) -> tuple[str, Finished]:
        """The whole text of a non-streamed request; cancels it if the client leaves first."""
        async def whole_text() -> tuple[str, Finished]:
            pieces = []
            async for text, finished in self.steps(handle):
                pieces.append(text)
                if finished is not None:
                    return "".join(pieces), finished
            raise AssertionError("a request's events end with Finished or Failed")

        return await self.until_disconnect(request.receive, handle, whole_text())

    async def until_disconnect(self, receive: Receive, handle: RequestHandle, work: Awaitable[T]) -> T:
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_client_left(receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            handle.cancel()
            self.metrics.disconnects.inc()
            raise ClientDisconnected()
        finally:
            task.cancel()
            watcher.cancel()


def get_service(request: Request) -> Service:
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


def usage(finished: Finished) -> dict[str, int]:
    return {"prompt_tokens": finished.input_length, "completion_tokens": finished.generated_tokens,
            "total_tokens": finished.input_length + finished.generated_tokens}
