"""Pure ASGI middleware (not BaseHTTPMiddleware, which would hide client disconnects from the routes):
request id + access log + request metrics, API keys, and the body-size limit."""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import APIError, error_response, payload_too_large, unauthorized
from service.metrics import ServiceMetrics

access_log = logging.getLogger("service.access")

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
PUBLIC_PATHS = {"/health", "/ready", "/info"}


class RequestContextMiddleware:
    """Echo a well-formed `X-Request-ID` or make one; count and time each request; write one JSON
    access-log line per request, with whatever fields the route left in `request.state.log`."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = Headers(scope=scope).get("x-request-id", "")
        request_id = incoming if REQUEST_ID_PATTERN.fullmatch(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500  # what the client sees if the app dies before it starts a response
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            duration = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_duration.labels(route).observe(duration)
            line = {"request_id": request_id, "method": scope["method"], "path": scope["path"],
                    "status": status, "duration_ms": round(duration * 1000, 2), **state.get("log", {})}
            access_log.info(json.dumps(line))


class APIKeyMiddleware:
    """`Authorization: Bearer <key>` on every route but the public ones and CORS preflights."""

    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self.api_keys = [key.encode() for key in api_keys]

    def _is_public(self, scope: Scope) -> bool:
        method, path = scope["method"], scope["path"]
        # GET / is the playground page; it holds no data and asks for the key itself.
        return method == "OPTIONS" or path in PUBLIC_PATHS or (method in ("GET", "HEAD") and path == "/")

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        # Compare with every key, in constant time each, so timing reveals neither a key nor which one.
        matched = False
        for key in self.api_keys:
            matched |= hmac.compare_digest(token.strip().encode(), key)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.api_keys or self._is_public(scope):
            return await self.app(scope, receive, send)
        header = Headers(scope=scope).get("authorization", "")
        if not header:
            error = unauthorized("missing API key: send `Authorization: Bearer <key>`")
        elif not self._authorized(header):
            error = unauthorized("invalid API key")
        else:
            return await self.app(scope, receive, send)
        await error_response(error, scope["path"])(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse bodies over `max_body_bytes` with 413: at once when Content-Length says so, else while
    reading (a chunked body has no Content-Length). The body is read here and replayed to the app."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = payload_too_large(self.max_body_bytes)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._refuse(too_large, scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                return await self.app(scope, _replay(message, receive), send)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await self._refuse(too_large, scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay(body, receive), send)

    @staticmethod
    async def _refuse(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(error, scope["path"])
        response.headers["Connection"] = "close"  # the rest of the body is not read
        await response(scope, receive, send)


def _replay(first: Message, receive: Receive) -> Receive:
    """A receive channel that returns `first`, then whatever the real channel brings."""
    pending = [first]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed
