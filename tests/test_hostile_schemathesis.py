"""Schemathesis against the service's own OpenAPI schema, in-process (a FakeEngine behind the app):
for every operation, valid and invalid requests generated from the schema get no 5xx, and every
response matches what the schema declares (status code, content type, headers, body).

Two gaps, each pinned by a test below rather than hidden:
- An SSE body is checked for status, content type and headers, not event by event: schemathesis
  validates each event ({"data", "event"}) against the declared `{"type": "string"}`.
- Invalid data must be refused (`negative_data_rejection`); the "off only" TGI and OpenAI options,
  once a boolean slipped through as 0 or 1, are pinned by a test of their own below.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gpt import CharTokenizer
from service.app import create_app
from service.settings import Settings
from tests.conftest import read_corpus
from tests.server_utils import FakeEngine

MAX_EXAMPLES = 60  # per operation
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          negative_data_rejection]


def make_app() -> object:
    # Built at import: schemathesis reads the schema when it parametrizes the tests below.
    engine = FakeEngine(CharTokenizer.from_text(read_corpus()), text="Friends, Romans")
    return create_app(Settings(checkpoint=Path("caesar-test"), max_new_tokens=64, default_max_new_tokens=16),
                      engine=engine)


app = make_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
cases: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_counts() -> Iterator[None]:
    yield
    print(f"\nschemathesis cases by operation: {dict(cases)} (total {sum(cases.values())})")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_the_api_keeps_to_its_own_schema(case: schemathesis.Case) -> None:
    cases[f"{case.method} {case.path}"] += 1
    response = case.call()
    streamed = response.headers.get("content-type", [""])[0].startswith("text/event-stream")
    case.validate_response(response, checks=CHECKS if streamed else [*CHECKS, response_schema_conformance])


def test_options_accepted_only_when_off_refuse_booleans() -> None:
    from fastapi.testclient import TestClient

    client = TestClient(app)
    for parameters in ({"frequency_penalty": False}, {"typical_p": True}, {"best_of": True},
                       {"watermark": 0}, {"decoder_input_details": 1}, {"top_n_tokens": False}):
        response = client.post("/generate", json={"inputs": "a", "parameters": parameters})
        assert response.status_code == 422, parameters
