"""Server-Sent Events responses: `data:` events only (no `event:` names, as TGI and OpenAI send them),
`: ping` comments every `keepalive_s`, and headers that keep proxies from buffering."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

from sse_starlette import EventSourceResponse, ServerSentEvent

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _ping() -> ServerSentEvent:
    return ServerSentEvent(comment="ping", sep="\n")


def encode_events(payloads: Iterable[str]) -> bytes:
    """Frame each payload (JSON, which holds no raw newline) as one `data:` event, all in one write:
    a client that fell behind gets its waiting characters in one send, still one event each."""
    return "".join(f"data: {payload}\n\n" for payload in payloads).encode()


def sse_response(events: AsyncIterator[bytes], keepalive_s: float) -> EventSourceResponse:
    """Stream pre-framed events (see encode_events), with `: ping` comments every `keepalive_s`."""
    return EventSourceResponse(events, headers=SSE_HEADERS, ping=keepalive_s, sep="\n",
                               ping_message_factory=_ping)
