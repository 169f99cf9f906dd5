"""The HTTP layer against a FakeEngine: request validation, error shapes, SSE framing, refusals before
the stream starts, middleware (API keys, body limit, request ids, CORS), /info, /metrics, settings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram

from gpt import CharTokenizer
from service import app as app_module
from service.__main__ import build_parser
from service.engine import EngineUnavailable, Failed, QueueFull
from service.metrics import LATENCY_BUCKETS, BatchHistogram
from service.settings import Settings
from tests.server_utils import FakeEngine, MakeClient, app_clients, metric_value

TEXT = FakeEngine.__dataclass_fields__["text"].default


@pytest.fixture
def make_client(tokenizer: CharTokenizer, tmp_path: Path) -> Iterator[MakeClient]:
    """make_client(engine options..., settings=dict(...)) -> a TestClient over a FakeEngine app."""
    yield from app_clients(FakeEngine, tokenizer, tmp_path / "caesar-test")


def sse_data(body: str) -> list[str]:
    """The data of each event in an SSE body (comments dropped)."""
    return [line.removeprefix("data:").strip() for line in body.splitlines() if line.startswith("data:")]


# --- Validation and error shapes -------------------------------------------------------------------

BAD_PARAMETERS = [
    ({"temperature": -1}, "parameters.temperature"),
    ({"temperature": 1e-9}, "parameters.temperature"),
    ({"top_p": 0}, "parameters.top_p"),
    ({"top_p": 1.5}, "parameters.top_p"),
    ({"top_k": 0}, "parameters.top_k"),
    ({"top_k": 2.5}, "parameters.top_k"),
    ({"max_new_tokens": 1.5}, "parameters.max_new_tokens"),
    ({"max_new_tokens": "5"}, "parameters.max_new_tokens"),
    ({"max_new_tokens": True}, "parameters.max_new_tokens"),
    ({"max_new_tokens": -1}, "parameters.max_new_tokens"),
    ({"max_new_tokens": 10_000}, "parameters.max_new_tokens"),  # over the server's limit (2048)
    ({"repetition_penalty": 0}, "parameters.repetition_penalty"),
    ({"seed": -1}, "parameters.seed"),
    ({"seed": 2**64}, "parameters.seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "parameters.stop"),
    ({"stop": [""]}, "parameters.stop"),
    ({"best_of": 2}, "parameters.best_of"),  # greedy by default: best_of needs sampling
    ({"best_of": 9, "do_sample": True}, "parameters.best_of"),
    ({"top_n_tokens": 6}, "parameters.top_n_tokens"),
    ({"top_p": 5e-324}, "parameters.top_p"),  # rounds to 0 in float32 (issue 15)
    ({"typical_p": 1e-40}, "parameters.typical_p"),
    ({"frequency_penalty": 2.5}, "parameters.frequency_penalty"),
    ({"frequency_penalty": 1e-300}, "parameters.frequency_penalty"),
    ({"watermark": True}, "parameters.watermark"),
    ({"grammar": {"type": "json", "value": {}}}, "parameters.grammar"),
    ({"no_such_option": 1}, "parameters.no_such_option"),
]


@pytest.mark.parametrize(("parameters", "param"), BAD_PARAMETERS)
def test_bad_native_parameters_are_422_in_tgi_shape(make_client: MakeClient, parameters: dict,
                                                    param: str) -> None:
    client = make_client()
    response = client.post("/generate", json={"inputs": "Caesar", "parameters": parameters})
    assert response.status_code == 422
    body = response.json()
    assert set(body) == {"error", "error_type"}
    assert body["error_type"] == "validation"
    assert param in body["error"]
    assert client.engine.requests == []


def test_non_finite_numbers_and_bad_json_are_422(make_client: MakeClient) -> None:
    client = make_client()
    headers = {"Content-Type": "application/json"}
    for raw in ['{"inputs": "a", "parameters": {"temperature": NaN}}',
                '{"inputs": "a", "parameters": {"top_p": Infinity}}',
                '{"inputs": "a", ', '[1, 2]', '{"inputs": 5}']:
        response = client.post("/generate", content=raw, headers=headers)
        assert response.status_code == 422, raw
        assert response.json()["error_type"] == "validation"


def test_unknown_characters_are_named(make_client: MakeClient) -> None:
    client = make_client()
    response = client.post("/generate", json={"inputs": "Cæsar — ☃"})
    assert response.status_code == 422
    message = response.json()["error"]
    assert "'æ'" in message and "'—'" in message and "'☃'" in message
    v1 = client.post("/v1/completions", json={"model": "caesar-test", "prompt": "Cæsar"})
    assert v1.status_code == 400
    assert v1.json()["error"]["code"] == "unknown_characters" and "'æ'" in v1.json()["error"]["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "a", "temperature": -0.5}, "temperature"),
    ({"prompt": "a", "max_tokens": 1.0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 4096}, "max_tokens"),
    ({"prompt": "a", "n": 9}, "n"),
    ({"prompt": "a", "n": 3, "best_of": 2}, "best_of"),
    ({"prompt": "a", "n": 2, "best_of": 3, "stream": True}, "best_of"),
    ({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, "stop"),
    ({"prompt": ["a"] * 33}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "a", "echo": 1}, "echo"),
    ({"prompt": "a", "logprobs": 6}, "logprobs"),
    ({"prompt": "a", "logprobs": True}, "logprobs"),
    ({"prompt": "a", "top_p": 5e-324}, "top_p"),  # rounds to 0 in float32 (issue 15)
    ({"prompt": "a", "min_p": 1e-39}, "min_p"),
    ({"prompt": "a", "presence_penalty": -2.5}, "presence_penalty"),
    ({"prompt": "a", "frequency_penalty": 3}, "frequency_penalty"),
    ({"prompt": "a", "logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "a", "logit_bias": {"1000": 1}}, "logit_bias"),
    ({"prompt": "a", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "a", "suffix": "z"}, "suffix"),
    ({}, "prompt"),
])
def test_bad_openai_requests_are_400_in_openai_envelope(make_client: MakeClient, body: dict,
                                                        param: str) -> None:
    client = make_client()
    response = client.post("/v1/completions", json={"model": "caesar-test", **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_unknown_model_and_routes_are_404(make_client: MakeClient) -> None:
    client = make_client()
    response = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "a"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    chat = client.post("/v1/chat/completions", json={})
    assert chat.status_code == 404 and chat.json()["error"]["type"] == "not_found_error"
    native = client.get("/no/such/route")
    assert native.status_code == 404 and native.json()["error_type"] == "not_found"
    assert client.get("/v1/models/gpt-4").status_code == 404


# --- Native generation and its SSE framing ---------------------------------------------------------

def test_generate_json(make_client: MakeClient) -> None:
    client = make_client()
    response = client.post("/generate", json={"inputs": "Caesar", "parameters": {
        "max_new_tokens": 7, "seed": 3, "details": True, "temperature": 0.5, "top_k": 5, "top_p": 0.9}})
    assert response.status_code == 200
    body = response.json()
    assert body["generated_text"] == TEXT[:7]
    assert body["details"]["finish_reason"] == "length"
    assert body["details"]["generated_tokens"] == 7 and body["details"]["input_length"] == 6
    assert "".join(t["text"] for t in body["details"]["tokens"]) == TEXT[:7]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 7, "total_tokens": 13}
    assert set(body["timings"]) == {"queue_ms", "time_to_first_token_ms", "total_ms", "tokens_per_s"}
    request = client.engine.requests[0]
    assert request.params.temperature == 0.5 and request.params.top_k == 5 and request.params.seed == 3


def test_generate_defaults_stop_and_full_text(make_client: MakeClient) -> None:
    client = make_client(settings={"default_max_new_tokens": 12})
    body = client.post("/generate", json={"inputs": ""}).json()
    assert body["generated_text"] == TEXT[:12] and body["details"] is None
    assert client.engine.requests[0].params.temperature == 0.0  # TGI: greedy unless sampling is asked for
    stopped = client.post("/generate", json={"inputs": "Caesar", "parameters": {
        "stop": ["Romans"], "details": True, "return_full_text": True, "max_new_tokens": 30}}).json()
    assert stopped["generated_text"] == "Caesar" + TEXT[:TEXT.index("Romans")]
    assert stopped["details"]["finish_reason"] == "stop_sequence"


def test_do_sample_false_without_settings_is_greedy(make_client: MakeClient) -> None:
    client = make_client()
    client.post("/generate", json={"inputs": "a", "parameters": {"do_sample": False}})
    client.post("/generate", json={"inputs": "a", "parameters": {"do_sample": False, "temperature": 0.7}})
    assert [r.params.temperature for r in client.engine.requests] == [0.0, 0.7]


def test_truncate_keeps_the_last_characters(make_client: MakeClient, tokenizer: CharTokenizer) -> None:
    client = make_client()
    client.post("/generate", json={"inputs": "Brutus", "parameters": {"truncate": 3}})
    assert client.engine.requests[0].prompt_ids == tokenizer.encode("tus")


@pytest.mark.parametrize(("path", "stream_flag"), [("/generate_stream", False), ("/generate", True)])
def test_native_stream_framing(make_client: MakeClient, path: str, stream_flag: bool) -> None:
    client = make_client()
    response = client.post(path, json={"inputs": "Caesar", "stream": stream_flag,
                                       "parameters": {"max_new_tokens": 9, "seed": 1}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert "event:" not in response.text  # TGI framing: bare data events
    events = [json.loads(data) for data in sse_data(response.text)]
    assert len(events) == 9  # one per character, the last one carrying the whole text
    assert [e["index"] for e in events] == list(range(9))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert "".join(e["token"]["text"] for e in events) == TEXT[:9] == events[-1]["generated_text"]
    assert all(set(e["token"]) == {"id", "text", "logprob", "special"} for e in events)
    assert events[-1]["details"] == {"finish_reason": "length", "generated_tokens": 9, "seed": 1,
                                     "input_length": 6, "truncated": False}
    assert events[-1]["usage"]["completion_tokens"] == 9


def test_stream_ending_on_a_stop_string_ends_with_a_special_token(make_client: MakeClient) -> None:
    client = make_client(text="abc STOP")
    response = client.post("/generate_stream", json={"inputs": "a", "parameters": {"stop": ["STOP"]}})
    events = [json.loads(data) for data in sse_data(response.text)]
    assert events[-1]["generated_text"] == "abc "
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
    assert "".join(e["token"]["text"] for e in events) == "abc "


def test_failure_mid_stream_is_an_error_event_then_the_end(make_client: MakeClient) -> None:
    client = make_client(fail_after=3)
    response = client.post("/generate_stream", json={"inputs": "a"})
    assert response.status_code == 200
    events = [json.loads(data) for data in sse_data(response.text)]
    assert [e["token"]["text"] for e in events[:-1]] == list(TEXT[:3])
    assert events[-1] == {"error": "generation failed: RuntimeError", "error_type": "generation"}
    v1 = client.post("/v1/completions", json={"model": "caesar-test", "prompt": "a", "stream": True})
    data = sse_data(v1.text)
    assert json.loads(data[-2])["error"]["type"] == "server_error" and data[-1] == "[DONE]"
    assert client.post("/generate", json={"inputs": "a"}).status_code == 500


def test_pings_while_queued(make_client: MakeClient) -> None:
    client = make_client(settings={"keepalive_s": 0.05}, admission_delay_s=0.4)
    response = client.post("/generate_stream", json={"inputs": "a", "parameters": {"max_new_tokens": 2}})
    assert response.status_code == 200
    before_first_event = response.text.split("data:")[0]
    assert ": ping" in before_first_event


# --- Refusals: real status codes, before any stream starts -----------------------------------------

@pytest.mark.parametrize(("options", "status", "code"), [
    ({"refuse": QueueFull()}, 429, "queue_full"),
    ({"refuse": EngineUnavailable("draining")}, 503, "draining"),
    ({"refuse": EngineUnavailable("loading")}, 503, "loading"),
    ({"queue_failure": Failed("queue_timeout", "no free row within 30 s")}, 503, "queue_timeout"),
])
def test_refusals_have_status_codes_and_retry_after(make_client: MakeClient, options: dict, status: int,
                                                    code: str) -> None:
    client = make_client(**options)
    for path in ("/generate", "/generate_stream"):
        response = client.post(path, json={"inputs": "a"})
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error_type"] in ("overloaded", "unavailable")
    for stream in (False, True):
        body = {"model": "caesar-test", "prompt": "a", "stream": stream}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == status and "retry-after" in response.headers
        assert response.json()["error"]["code"] == code


# --- OpenAI completions ---------------------------------------------------------------------------

def test_openai_completion_json(make_client: MakeClient) -> None:
    client = make_client()
    response = client.post("/v1/completions", json={"model": "caesar-test", "prompt": ["Caesar"],
                                                     "stop": "Romans", "max_tokens": 30})
    body = response.json()
    assert response.status_code == 200
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": TEXT[:TEXT.index("Romans")], "logprobs": None,
                                "finish_reason": "stop"}]
    assert body["usage"]["prompt_tokens"] == 6
    default = client.post("/v1/completions", json={"model": "caesar-test", "prompt": "a"}).json()
    assert len(default["choices"][0]["text"]) == 16 and default["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("include_usage", [False, True])
def test_openai_stream(make_client: MakeClient, include_usage: bool) -> None:
    client = make_client()
    response = client.post("/v1/completions", json={
        "model": "caesar-test", "prompt": "a", "max_tokens": 5, "stream": True,
        "stream_options": {"include_usage": include_usage}})
    data = sse_data(response.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    usage_chunks = [c for c in chunks if not c["choices"]]
    text_chunks = [c for c in chunks if c["choices"]]
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == TEXT[:5]
    assert [c["choices"][0]["finish_reason"] for c in text_chunks] == [None] * 4 + ["length"]
    assert len({c["id"] for c in chunks}) == 1
    if include_usage:
        assert len(usage_chunks) == 1 and usage_chunks[0]["usage"]["completion_tokens"] == 5
    else:
        assert usage_chunks == []


def test_models(make_client: MakeClient) -> None:
    client = make_client()
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [("caesar-test", 64)]
    assert client.get("/v1/models/caesar-test").json()["id"] == "caesar-test"


# --- Operations -----------------------------------------------------------------------------------

def test_health_ready_info(make_client: MakeClient) -> None:
    client = make_client(settings={"api_keys": ["sekrit-key"]})
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready", "queue": 0, "running": 0}
    info = client.get("/info")
    assert info.status_code == 200
    assert "sekrit-key" not in info.text and "api_keys" not in info.json()["settings"]
    assert info.json()["settings"]["auth_required"] is True
    assert info.json()["limits"]["max_new_tokens"] == 2048
    assert info.json()["model"]["context"] == 64
    assert info.json()["limits"]["max_logprobs"] == 5 and info.json()["limits"]["max_n"] == 8
    assert {"logprobs", "echo", "n", "best_of", "logit_bias"} <= set(info.json()["parameters"]["openai"])
    assert {"top_n_tokens", "decoder_input_details", "typical_p"} <= set(info.json()["parameters"]["native"])
    assert "raw distribution" in info.json()["logprobs"]
    client.engine.restarting = True
    client.engine.ready = False
    restarting = client.get("/ready")
    assert restarting.status_code == 503 and restarting.json()["status"] == "restarting"
    client.engine.draining = True
    client.engine.ready = False
    draining = client.get("/ready")
    assert draining.status_code == 503 and draining.json()["status"] == "draining"
    assert "retry-after" in draining.headers


def test_tokenize(make_client: MakeClient, tokenizer: CharTokenizer) -> None:
    client = make_client()
    tokens = client.post("/tokenize", json={"inputs": "Et tu"}).json()
    assert [t["id"] for t in tokens] == tokenizer.encode("Et tu")
    assert [(t["text"], t["start"], t["stop"]) for t in tokens][:2] == [("E", 0, 1), ("t", 1, 2)]
    assert client.post("/tokenize", json={"inputs": "€"}).status_code == 422


def test_metrics(make_client: MakeClient) -> None:
    client = make_client()
    client.post("/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 4}})
    client.post("/generate", json={"inputs": "€"})
    text = client.get("/metrics").text
    assert 'caesar_requests_total{route="/generate",status="200"} 1.0' in text
    assert 'caesar_requests_total{route="/generate",status="422"} 1.0' in text
    assert metric_value(text, "caesar_generated_tokens_total") == 4
    assert metric_value(text, "caesar_running_rows") == 0 and metric_value(text, "caesar_queue_size") == 0
    for name in ("caesar_time_to_first_token_seconds", "caesar_inter_token_latency_seconds",
                 "caesar_request_duration_seconds", "caesar_disconnects_total"):
        assert name in text


def test_a_batch_histogram_exposes_what_a_prometheus_histogram_of_the_same_observations_does() -> None:
    """BatchHistogram (the inter-character latency, filled a whole answer at a time) against
    prometheus_client's own Histogram: the same buckets, count and sum, values on a bound included."""
    values = [0.0, 0.001, 0.0011, 0.004, 0.0049, 0.005, 0.03, 0.3, 2.5, 29.0, 31.0, 1e9]
    batched, reference = CollectorRegistry(), CollectorRegistry()
    histogram = BatchHistogram("gaps_seconds", "gaps", LATENCY_BUCKETS)
    batched.register(histogram)
    expected = Histogram("gaps_seconds", "gaps", buckets=LATENCY_BUCKETS, registry=reference)
    histogram.observe_many(values[:5])
    histogram.observe_many(())
    histogram.observe(values[5])
    histogram.observe_many(iter(values[6:]))
    for value in values:
        expected.observe(value)

    def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
        return {(sample.name, sample.labels.get("le", "")): sample.value
                for metric in registry.collect() for sample in metric.samples
                if not sample.name.endswith("_created")}

    got, want = samples(batched), samples(reference)
    key = ("gaps_seconds_sum", "")
    assert got.pop(key) == pytest.approx(want.pop(key), rel=1e-15)  # summed in another order
    assert got == want
    assert got[("gaps_seconds_bucket", "0.005")] == 6 and got[("gaps_seconds_count", "")] == len(values)


def test_playground_page(make_client: MakeClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    client = make_client(settings={"api_keys": ["k"]})
    monkeypatch.setattr(app_module, "STATIC_DIR", tmp_path)
    assert client.get("/").status_code == 404
    (tmp_path / "index.html").write_text("<!doctype html><title>playground</title>")
    page = client.get("/")  # public even with keys: the page asks for the key itself
    assert page.status_code == 200 and "playground" in page.text
    assert page.headers["content-type"].startswith("text/html")


# --- Middleware -----------------------------------------------------------------------------------

def test_api_keys(make_client: MakeClient) -> None:
    client = make_client(settings={"api_keys": ["key-one", "key-two"]})
    body = {"inputs": "a", "parameters": {"max_new_tokens": 2}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic key-one"},
                    {"Authorization": "Bearer"}, {"Authorization": "Bearer key-one-and-more"}):
        response = client.post("/generate", json=body, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error_type"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    for key in ("key-one", "key-two"):
        authorized = client.post("/generate", json=body, headers={"Authorization": f"Bearer {key}"})
        assert authorized.status_code == 200
    v1 = client.get("/v1/models")
    assert v1.status_code == 401 and v1.json()["error"]["type"] == "authentication_error"
    assert client.get("/metrics").status_code == 401
    for public in ("/health", "/ready", "/info"):
        assert client.get(public).status_code == 200


def test_body_size_limit(make_client: MakeClient) -> None:
    client = make_client(settings={"max_body_bytes": 1000})
    big = {"inputs": "a" * 2000}
    declared = client.post("/generate", json=big)
    assert declared.status_code == 413 and declared.json()["error_type"] == "payload_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        payload = json.dumps(big).encode()
        for start in range(0, len(payload), 256):
            yield payload[start:start + 256]

    streamed = client.post("/generate", content=chunked(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    v1 = client.post("/v1/completions", json={"model": "caesar-test", "prompt": "a" * 2000})
    assert v1.status_code == 413 and v1.json()["error"]["code"] == "payload_too_large"
    assert client.post("/generate", json={"inputs": "a" * 900}).status_code == 200
    assert client.engine.requests and len(client.engine.requests) == 1


def test_request_id_is_echoed_or_made(make_client: MakeClient) -> None:
    client = make_client()
    assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = client.get("/health", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
    assert made != "bad id with spaces" and len(made) == 32
    completion = client.post("/v1/completions", json={"model": "caesar-test", "prompt": "a"},
                             headers={"X-Request-ID": "req-7"})
    assert completion.json()["id"] == "cmpl-req-7"


def test_cors_only_when_configured(make_client: MakeClient) -> None:
    preflight = {"Origin": "https://stage.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    closed = make_client()
    assert "access-control-allow-origin" not in closed.get("/health", headers={"Origin": "https://x"}).headers
    opened = make_client(settings={"cors_origins": ["https://stage.example"], "api_keys": ["k"]})
    response = opened.options("/generate", headers=preflight)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://stage.example"
    assert "authorization" in response.headers["access-control-allow-headers"].lower()


def test_access_log_is_one_json_line(make_client: MakeClient, caplog: pytest.LogCaptureFixture) -> None:
    client = make_client()
    with caplog.at_level("INFO", logger="service.access"):
        client.post("/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 3}},
                    headers={"X-Request-ID": "log-me"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "service.access"]
    assert len(lines) == 1
    assert lines[0]["request_id"] == "log-me" and lines[0]["status"] == 200
    assert lines[0]["generated_tokens"] == 3 and lines[0]["finish_reason"] == "length"


# --- Settings -------------------------------------------------------------------------------------

def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAESAR_API_KEYS", "one, two,,three")
    monkeypatch.setenv("CAESAR_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("CAESAR_CORS_ORIGINS", "https://a.example")
    settings = Settings()
    assert settings.api_keys == ["one", "two", "three"]
    assert settings.max_batch_size == 8 and settings.cors_origins == ["https://a.example"]
    assert Settings(max_batch_size=4).max_batch_size == 4  # what a flag passes wins over the environment
    with pytest.raises(ValueError):
        Settings(default_max_new_tokens=10, max_new_tokens=5)


def test_every_setting_has_a_flag() -> None:
    parser = build_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in flags
    args = parser.parse_args(["--max-batch-size", "3", "--no-compile", "--device", "cpu"])
    assert (args.max_batch_size, args.compile, args.device) == ("3", False, "cpu")


def test_openapi_schema_documents_the_api(make_client: MakeClient) -> None:
    schema = make_client().get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/generate", "/generate_stream", "/tokenize", "/v1/completions", "/v1/models", "/health",
                 "/ready", "/info", "/metrics"):
        assert path in paths, path
    generate = paths["/generate"]["post"]["responses"]
    assert {"200", "413", "422", "429", "503"} <= set(generate)
    assert "text/event-stream" in generate["200"]["content"]
    assert "400" in paths["/v1/completions"]["post"]["responses"]
