"""Errors as the clients expect them: TGI's `{"error", "error_type"}` on native routes, OpenAI's
`{"error": {"message", "type", "param", "code"}}` envelope under /v1 (where a 422 becomes a 400)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from pydantic import ValidationError
from starlette.responses import JSONResponse

MAX_MESSAGE_CHARS = 1000  # never echo a whole (possibly huge) input back

# Native error_type -> OpenAI error type.
OPENAI_TYPES = {
    "validation": "invalid_request_error",
    "payload_too_large": "invalid_request_error",
    "unauthorized": "authentication_error",
    "not_found": "not_found_error",
    "method_not_allowed": "invalid_request_error",
    "overloaded": "overloaded_error",
    "unavailable": "server_error",
    "generation": "server_error",
    "shutdown": "server_error",
    "internal": "server_error",
}

PYDANTIC_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}

RETRY_AFTER_QUEUE_FULL_S = 1
RETRY_AFTER_QUEUE_TIMEOUT_S = 2
RETRY_AFTER_UNAVAILABLE_S = 5


class APIError(Exception):
    def __init__(self, status: int, message: str, error_type: str, code: str | None = None,
                 param: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message[:MAX_MESSAGE_CHARS]
        self.error_type = error_type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_body(error: APIError, openai: bool) -> dict:
    if openai:
        error_type = OPENAI_TYPES.get(error.error_type, "server_error")
        return {"error": {"message": error.message, "type": error_type, "param": error.param,
                          "code": error.code}}
    return {"error": error.message, "error_type": error.error_type}


def error_response(error: APIError, path: str) -> JSONResponse:
    openai = is_openai_path(path)
    status = 400 if openai and error.status == 422 else error.status
    return JSONResponse(error_body(error, openai), status_code=status, headers=error.headers)


def stream_error_payload(error_type: str, message: str, openai: bool, code: str | None = None) -> str:
    """The data of an SSE error event, for a failure after the stream has started; `code` as the
    JSON answer to the same failure would carry it (default: the error type)."""
    error = APIError(500, message, error_type, code=code or error_type)
    return json.dumps(error_body(error, openai), separators=(",", ":"))


# --- Constructors for the errors the routes raise ---

def invalid(message: str, param: str | None = None, code: str = "invalid_parameter") -> APIError:
    return APIError(422, message, "validation", code=code, param=param)


def from_validation_error(error: ValidationError | list[dict]) -> APIError:
    """One readable message from pydantic's errors: `field: problem; field: problem`."""
    problems = error.errors() if isinstance(error, ValidationError) else error
    parts, first_param = [], None
    for problem in problems:
        # Keep field names: drop "body", list indices, and the union branches pydantic tried
        # (`str`, `list[constrained-str]`, `function-after[...]`...).
        loc = [str(p) for p in problem.get("loc", ()) if isinstance(p, str) and p != "body"
               and not any(mark in p for mark in "[-") and p not in PYDANTIC_TYPE_NAMES]
        where = ".".join(loc) or "body"
        first_param = first_param or (where if loc else None)
        # pydantic words a validator's own message "Value error, ...": the message alone reads better.
        message = str(problem.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    message = "; ".join(dict.fromkeys(parts)) or "invalid request"
    return invalid(message, param=first_param)


def queue_full() -> APIError:
    return APIError(429, "the server is busy: every row is generating and the queue is full; retry shortly",
                    "overloaded", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_QUEUE_FULL_S)})


def queue_timeout(message: str) -> APIError:
    return APIError(503, message, "overloaded", code="queue_timeout",
                    headers={"Retry-After": str(RETRY_AFTER_QUEUE_TIMEOUT_S)})


def unavailable(reason: str) -> APIError:
    messages = {"loading": "the model is still loading", "draining": "the server is shutting down",
                "unhealthy": "the generation engine stopped",
                "restarting": "the generation engine is restarting; retry shortly"}
    return APIError(503, messages.get(reason, reason), "unavailable", code=reason,
                    headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)})


def unauthorized(message: str) -> APIError:
    return APIError(401, message, "unauthorized", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def payload_too_large(limit: int) -> APIError:
    return APIError(413, f"request body larger than {limit} bytes", "payload_too_large",
                    code="payload_too_large")
