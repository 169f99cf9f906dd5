"""Hostile input against the real engine: a real `python -m service` (the default two-process mode) on
the tiny checkpoint, where tests/test_hostile_input.py and tests/test_hostile_schemathesis.py put a
FakeEngine that never samples.

- The hypothesis strategies of tests/test_hostile_input.py (imported, not copied) and schemathesis on
  the service's own OpenAPI schema: no 5xx, no `error` event in a 200 stream, the documented error shapes.
- Good seeded requests running together with hostile-but-valid ones (top_p 1e-38, repetition_penalty
  100 and 0.01, temperature 0.001 and 100, a huge top_k, max_new_tokens 0, prompts longer than the
  context) keep exactly the text they produce alone; the hostile ones get a 200 or a 4xx, never a 5xx.

Example counts are small (a few dozen per property) so that the suite stays fast.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_utils import ServerProcess, metric_value, running_server
from tests.test_hostile_input import (
    MODEL,
    POST_ROUTES,
    check_answer,
    dumps,
    json_values,
    native_bodies,
    openai_bodies,
)
from tests.test_hostile_schemathesis import CHECKS, response_schema_conformance
from tests.test_hostile_schemathesis import app as fake_app

MAX_EXAMPLES = 25  # per hypothesis property
SCHEMA_EXAMPLES = 15  # per operation
REAL_SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# The limits the fake-engine tests were written against (their app's settings), so that the same
# strategies and the same schema mean the same here.
SERVER_OPTIONS = ("--model-name", MODEL, "--max-new-tokens", "64", "--default-max-new-tokens", "16",
                  "--max-body-bytes", str(64 * 1024), "--max-batch-size", "8", "--max-queue", "96",
                  "--log-level", "warning")


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    with running_server(tiny_checkpoint, *SERVER_OPTIONS) as running:
        yield running
        metrics = httpx.get(f"{running.base_url}/metrics", timeout=10).text
        assert metric_value(metrics, "caesar_engine_restarts_total") == 0, "the engine process died"
        assert running.process.poll() is None, running.log()


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def stream_errors(response: httpx.Response) -> list[str]:
    """The `error` events of a 200 stream (a failure after the stream started)."""
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        return []
    events = [line.removeprefix("data:").strip() for line in response.text.splitlines()
              if line.startswith("data:")]
    return [event for event in events if event != "[DONE]" and "error" in json.loads(event)]


def check_real_answer(response: httpx.Response, path: str) -> None:
    check_answer(response, path)
    if response.status_code == 200:
        assert not stream_errors(response), (path, response.text[-500:])


def post_json_text(http: httpx.Client, path: str, text: str) -> None:
    response = http.post(path, content=text.encode("utf-8", "surrogatepass"),
                         headers={"Content-Type": "application/json"})
    check_real_answer(response, path)


# --- tests/test_hostile_input.py's strategies, against the real engine ------------------------------

@REAL_SETTINGS
@given(body=native_bodies(), path=st.sampled_from(["/generate", "/generate_stream"]))
def test_native_fields_with_hostile_values(http: httpx.Client, path: str, body: dict[str, Any]) -> None:
    post_json_text(http, path, dumps(body))


@REAL_SETTINGS
@given(body=openai_bodies())
def test_openai_fields_with_hostile_values(http: httpx.Client, body: dict[str, Any]) -> None:
    post_json_text(http, "/v1/completions", dumps(body))


@REAL_SETTINGS
@given(path=st.sampled_from(POST_ROUTES), body=json_values)
def test_any_json_body_on_any_route(http: httpx.Client, path: str, body: Any) -> None:
    post_json_text(http, path, dumps(body))


# --- Schemathesis on the service's schema, against the real engine -----------------------------------

# The schema of the fake-engine app (the same routes and models as the real one); the cases go to the
# real server.
schema = schemathesis.openapi.from_dict(fake_app.openapi())


@schema.parametrize()
@settings(max_examples=SCHEMA_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_the_real_server_keeps_to_its_schema(case: schemathesis.Case, server: ServerProcess) -> None:
    response = case.call(base_url=server.base_url, timeout=60)
    streamed = response.headers.get("content-type", [""])[0].startswith("text/event-stream")
    case.validate_response(response, checks=CHECKS if streamed else [*CHECKS, response_schema_conformance])
    if streamed and response.status_code == 200:
        events = [line.removeprefix("data:").strip() for line in response.text.splitlines()
                  if line.startswith("data:")]
        assert not [e for e in events if e != "[DONE]" and "error" in json.loads(e)], response.text[-500:]


# --- Good requests beside hostile ones ---------------------------------------------------------------

NEW = 40
GOOD: list[tuple[str, dict[str, Any]]] = [
    ("/generate", {"inputs": "CAESAR.\n", "parameters": {"max_new_tokens": NEW, "seed": 1,
                                                         "temperature": 0.8}}),
    ("/generate", {"inputs": "BRUTUS.", "parameters": {"max_new_tokens": NEW, "seed": 2, "top_k": 10,
                                                       "top_p": 0.9}}),
    ("/generate_stream", {"inputs": "Friends, Romans", "parameters": {"max_new_tokens": NEW, "seed": 3,
                                                                      "repetition_penalty": 1.3}}),
    ("/generate", {"inputs": "the ", "parameters": {"max_new_tokens": NEW, "temperature": 0}}),
    ("/v1/completions", {"model": MODEL, "prompt": "ANTONY.", "max_tokens": NEW, "seed": 4,
                         "temperature": 1.2}),
    ("/v1/completions", {"model": MODEL, "prompt": "CASSIUS.", "max_tokens": NEW, "seed": 5, "top_p": 0.5,
                         "stream": True}),
]
HOSTILE_PARAMETERS: list[dict[str, Any]] = [
    # Below float32's smallest normal number: refused at the edge (4xx) or honoured, never a 5xx.
    {"top_p": 1e-38}, {"top_p": 5e-324},
    # Valid and extreme: honoured.
    {"top_p": 1.2e-38}, {"top_p": 1e-30, "temperature": 100.0}, {"repetition_penalty": 100.0},
    {"repetition_penalty": 0.01}, {"temperature": 0.001}, {"temperature": 100.0}, {"top_k": 10**12},
    {"top_k": 2**63 - 1}, {"max_new_tokens": 0}, {"temperature": 0.001, "repetition_penalty": 100.0},
    {"temperature": 100.0, "top_p": 1.2e-38, "top_k": 1}, {"repetition_penalty": 0.01, "temperature": 0.001},
    # Prompts longer than the context (64 characters for the tiny model).
    {"prompt": "a" * 5000}, {"prompt": "CAESAR. " * 40, "repetition_penalty": 100.0, "top_p": 1.2e-38},
]


def hostile_requests() -> list[tuple[str, dict[str, Any]]]:
    """Each hostile setting on both APIs, plain and streamed."""
    requests = []
    for n, hostile in enumerate(HOSTILE_PARAMETERS):
        hostile = dict(hostile)
        prompt = hostile.pop("prompt", "CAESAR.")
        new = hostile.pop("max_new_tokens", 24)
        seed = {"seed": 1000 + n}
        native = {"inputs": prompt, "parameters": {"max_new_tokens": new, **seed, **hostile}}
        openai = {"model": MODEL, "prompt": prompt, "max_tokens": new, **seed, **hostile}
        requests += [("/generate", native), ("/generate_stream", native),
                     ("/v1/completions", openai), ("/v1/completions", {**openai, "stream": True})]
    return requests


def text_of(path: str, body: dict[str, Any], response: httpx.Response) -> str:
    """The generated text of a 200, checked for consistency (a stream's pieces make its final text)."""
    assert response.status_code == 200, (path, body, response.status_code, response.text[:300])
    assert not stream_errors(response), (path, body, response.text[-300:])
    if path == "/generate":
        return response.json()["generated_text"]
    events = [json.loads(line.removeprefix("data:")) for line in response.text.splitlines()
              if line.startswith("data:") and line != "data: [DONE]"]
    if path == "/generate_stream":
        text = "".join(event["token"]["text"] for event in events if event["token"]["text"])
        assert events[-1]["generated_text"] == text
        return text
    if body.get("stream"):
        return "".join(event["choices"][0]["text"] for event in events if event["choices"])
    return response.json()["choices"][0]["text"]


def send(http: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    return http.post(path, json=body)


def test_good_requests_keep_their_text_beside_hostile_ones(http: httpx.Client) -> None:
    alone = [text_of(path, body, send(http, path, body)) for path, body in GOOD]
    assert all(len(text) == NEW for text in alone)
    hostile = hostile_requests()
    problems = []
    with ThreadPoolExecutor(len(GOOD) + len(hostile)) as pool:
        for round_ in range(2):
            # Interleaved, so that good and hostile requests share prefill groups and decode steps.
            mixed = [("hostile", n, *request) for n, request in enumerate(hostile)]
            for n, request in reversed(list(enumerate(GOOD))):
                mixed.insert((n * len(hostile)) // len(GOOD) + round_, ("good", n, *request))
            futures = [(kind, n, path, body, pool.submit(send, http, path, body))
                       for kind, n, path, body in mixed]
            for kind, n, path, body, future in futures:
                response = future.result(timeout=120)
                if kind == "good":
                    try:
                        text = text_of(path, body, response)
                    except AssertionError as error:
                        problems.append(f"round {round_}: good request {n} failed: {error}")
                        continue
                    if text != alone[n]:
                        problems.append(f"round {round_}: good request {n} changed: {alone[n]!r} -> {text!r}")
                elif response.status_code >= 500 or stream_errors(response):
                    problems.append(f"round {round_}: hostile {path} {body.get('parameters', body)} got "
                                    f"{response.status_code}: {response.text[-200:]}")
                elif response.status_code == 200:
                    new = body.get("max_tokens", body.get("parameters", {}).get("max_new_tokens"))
                    if len(text_of(path, body, response)) != new:
                        problems.append(f"round {round_}: hostile {path} {body} gave the wrong length")
                else:
                    check_answer(response, path)  # a 4xx in the documented shape
    assert not problems, "\n".join(problems)
