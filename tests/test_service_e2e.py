"""End to end: `python -m service` in a subprocess on the tiny random checkpoint, driven by the
clients people already use (openai, huggingface_hub, httpx-sse) and by plain HTTP."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import torch
from httpx_sse import connect_sse
from huggingface_hub import InferenceClient

from service.__main__ import main
from tests.server_utils import ServerProcess, metric_value, running_server

pytestmark = pytest.mark.slow

LONG = 100_000  # new characters for requests that must still be running when the test acts


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    with running_server(tiny_checkpoint, "--max-batch-size", "12", "--max-queue", "0", "--max-new-tokens",
                        str(LONG), "--max-body-bytes", "4096", "--keepalive-s", "1") as server:
        yield server


def native_text(server: ServerProcess, prompt: str, **parameters: object) -> str:
    response = httpx.post(f"{server.base_url}/generate", json={"inputs": prompt, "parameters": parameters},
                          timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["generated_text"]


def sse_data(lines: Iterator[str]) -> list[str]:
    return [line.removeprefix("data:").strip() for line in lines if line.startswith("data:")]


def wait_for_metric(server: ServerProcess, name: str, predicate: object, timeout_s: float = 10) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        value = metric_value(httpx.get(f"{server.base_url}/metrics").text, name)
        if predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def test_openai_client(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    completion = client.completions.create(model="tiny", prompt="CAESAR:", max_tokens=24, seed=5,
                                           temperature=0.8)
    text = completion.choices[0].text
    assert len(text) == 24 and completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 24 and completion.usage.prompt_tokens == 7
    stream = client.completions.create(model="tiny", prompt="CAESAR:", max_tokens=24, seed=5, temperature=0.8,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == 31
    with pytest.raises(openai.BadRequestError, match="unknown|vocabulary"):
        client.completions.create(model="tiny", prompt="Cæsar", max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="a", max_tokens=4, top_p=2.0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="a", max_tokens=4)


def test_huggingface_inference_client(server: ServerProcess) -> None:
    client = InferenceClient(base_url=server.base_url)
    options = {"max_new_tokens": 30, "seed": 11, "do_sample": True, "temperature": 0.9}
    answer = client.text_generation("BRUTUS:", details=True, **options)
    assert len(answer.generated_text) == 30
    assert answer.details.finish_reason == "length" and answer.details.generated_tokens == 30
    assert answer.details.seed == 11
    events = list(client.text_generation("BRUTUS:", details=True, stream=True, **options))
    assert "".join(e.token.text for e in events) == answer.generated_text == events[-1].generated_text
    assert events[-1].details.finish_reason == "length"
    assert client.text_generation("BRUTUS:", **options) == answer.generated_text


def test_sse_stream_concatenates_to_the_json_answer(server: ServerProcess) -> None:
    parameters = {"max_new_tokens": 50, "seed": 3, "temperature": 1.0, "top_k": 40}
    with httpx.Client(base_url=server.base_url, timeout=30) as client, \
            connect_sse(client, "POST", "/generate_stream",
                        json={"inputs": "Friends, Romans", "parameters": parameters}) as source:
        assert source.response.headers["x-accel-buffering"] == "no"
        events = [json.loads(event.data) for event in source.iter_sse()]
    assert len(events) == 50
    streamed = "".join(event["token"]["text"] for event in events)
    assert streamed == events[-1]["generated_text"] == native_text(server, "Friends, Romans", **parameters)


def test_the_inter_character_latency_counts_each_gap_of_a_json_answer_and_of_a_stream(
        server: ServerProcess) -> None:
    """caesar_inter_token_latency_seconds: a JSON answer of n characters adds its n - 1 gaps at its end
    (service.metrics.BatchHistogram, all at once), a stream each gap as it comes; every gap lands in a
    bucket, and none is negative."""
    def histogram() -> tuple[float, float, float]:
        text = httpx.get(f"{server.base_url}/metrics").text
        return (metric_value(text, "caesar_inter_token_latency_seconds_count"),
                metric_value(text, "caesar_inter_token_latency_seconds_sum"),
                float(next(line.split()[1] for line in text.splitlines() if line.startswith(
                    'caesar_inter_token_latency_seconds_bucket{le="+Inf"}'))))

    count, total, _ = histogram()
    assert len(native_text(server, "Friends", max_new_tokens=40, seed=1, temperature=1.0)) == 40
    after_json, total_json, _ = histogram()
    assert after_json - count == 39 and total_json >= total
    with httpx.Client(base_url=server.base_url, timeout=30) as client, \
            connect_sse(client, "POST", "/generate_stream",
                        json={"inputs": "Friends", "parameters": {"max_new_tokens": 30}}) as source:
        assert len(list(source.iter_sse())) == 30
    after_stream, total_stream, in_buckets = histogram()
    assert after_stream - after_json == 29 and total_stream >= total_json and in_buckets == after_stream


def test_same_seed_alone_and_among_eight_others(server: ServerProcess) -> None:
    assert_same_seed_alone_and_among_eight_others(server)


def assert_same_seed_alone_and_among_eight_others(server: ServerProcess) -> None:
    parameters = {"max_new_tokens": 60, "seed": 1234, "temperature": 0.8}
    alone = native_text(server, "CASSIUS:", **parameters)

    def other(n: int) -> str:
        return native_text(server, "ROME " * n, max_new_tokens=80, seed=n)

    with ThreadPoolExecutor(9) as pool:
        others = [pool.submit(other, n) for n in range(8)]
        together = pool.submit(native_text, server, "CASSIUS:", **parameters)
        assert all(len(o.result()) == 80 for o in others)
        assert together.result() == alone


def test_disconnect_frees_the_row(server: ServerProcess) -> None:
    disconnects = metric_value(httpx.get(f"{server.base_url}/metrics").text, "caesar_disconnects_total")
    body = {"inputs": "a", "parameters": {"max_new_tokens": LONG}}
    with httpx.Client(base_url=server.base_url, timeout=30) as client, \
            client.stream("POST", "/generate_stream", json=body) as response:
        lines = response.iter_lines()  # kept: a dropped line iterator closes the response
        next(lines)
        assert wait_for_metric(server, "caesar_running_rows", lambda v: v == 1) == 1
    assert wait_for_metric(server, "caesar_running_rows", lambda v: v == 0) == 0
    # A non-streamed request whose client gives up is cancelled too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/generate", json=body, timeout=httpx.Timeout(30, read=0.5))
    assert wait_for_metric(server, "caesar_running_rows", lambda v: v == 0) == 0
    after = wait_for_metric(server, "caesar_disconnects_total", lambda v: v >= disconnects + 2)
    assert after == disconnects + 2


@pytest.mark.parametrize(("request_kwargs", "status", "fragment"), [
    ({"json": {"inputs": "Cæsar"}}, 422, "'æ'"),
    ({"json": {"inputs": "a", "parameters": {"top_k": 0}}}, 422, "top_k"),
    ({"json": {"inputs": "a" * 5000}}, 413, "larger than 4096 bytes"),
    ({"content": b"not json", "headers": {"Content-Type": "application/json"}}, 422, "JSON"),
])
def test_errors_over_the_wire(server: ServerProcess, request_kwargs: dict, status: int,
                              fragment: str) -> None:
    for path in ("/generate", "/generate_stream"):
        response = httpx.post(f"{server.base_url}{path}", timeout=10, **request_kwargs)
        assert response.status_code == status
        assert fragment in response.json()["error"]


def test_queue_full_is_429_with_retry_after(server: ServerProcess) -> None:
    # This server has 12 rows and no waiting queue: a 13th request in flight is refused at once.
    body = {"inputs": "a", "parameters": {"max_new_tokens": LONG}}
    with httpx.Client(base_url=server.base_url, timeout=30) as client, contextlib.ExitStack() as streams:
        for _ in range(12):
            stream = streams.enter_context(client.stream("POST", "/generate_stream", json=body))
            assert stream.status_code == 200
        assert wait_for_metric(server, "caesar_running_rows", lambda v: v == 12) == 12
        refused = client.post("/generate_stream", json=body)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error_type"] == "overloaded"
        v1 = client.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 5})
        assert v1.status_code == 429 and v1.json()["error"]["code"] == "queue_full"
        assert client.get("/ready").status_code == 200
    assert wait_for_metric(server, "caesar_running_rows", lambda v: v == 0) == 0


def test_sigterm_drains_then_exits_zero(tiny_checkpoint: Path) -> None:
    options = ("--drain-timeout-s", "3", "--max-new-tokens", str(LONG))
    with running_server(tiny_checkpoint, *options) as server, \
            httpx.Client(base_url=server.base_url, timeout=30) as client:
        short_body = {"inputs": "a", "parameters": {"max_new_tokens": 30}}
        long_body = {"inputs": "a", "parameters": {"max_new_tokens": LONG}}
        with client.stream("POST", "/generate_stream", json=long_body) as long_stream, \
                client.stream("POST", "/generate_stream", json=short_body) as short_stream:
            long_lines = long_stream.iter_lines()
            next(long_lines)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            assert client.get("/ready").status_code == 503
            refused = client.post("/generate", json=short_body)
            assert refused.status_code == 503 and "retry-after" in refused.headers
            short_events = [json.loads(data) for data in sse_data(short_stream.iter_lines())]
            long_events = [json.loads(data) for data in sse_data(long_lines)]
        assert short_events[-1]["details"]["finish_reason"] == "length"  # finished within the grace period
        assert long_events[-1]["error_type"] == "unavailable"  # ended when the grace period ran out
        assert server.process.wait(timeout=15) == 0


def engine_processes(server: ServerProcess) -> list[psutil.Process]:
    """The server's children that run an engine (multiprocessing may add its resource tracker)."""
    return [child for child in psutil.Process(server.process.pid).children()
            if "spawn_main" in " ".join(child.cmdline())]


def test_the_engine_process_dying_is_reported_not_hung_on(tiny_checkpoint: Path) -> None:
    """The model runs in a child process (the default); if it dies, running streams end with an
    error event, /ready turns 503 while a new one starts (/health stays 200), new requests get 503
    saying so, and the server still stops cleanly (restarts: tests/test_engine_supervision.py)."""
    with running_server(tiny_checkpoint, "--max-new-tokens", str(LONG)) as server, \
            httpx.Client(base_url=server.base_url, timeout=30) as client:
        (engine,) = engine_processes(server)
        model = client.get("/info").json()["model"]
        assert model["cpu_threads"] == 1  # CAESAR_THREADS=1 reached it
        assert model["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        with client.stream("POST", "/generate_stream",
                           json={"inputs": "a", "parameters": {"max_new_tokens": LONG}}) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data:")
            engine.kill()
            events = [json.loads(data) for data in sse_data(lines)]
        assert events[-1] == {"error": "the generation engine stopped and is restarting; retry shortly",
                              "error_type": "unavailable"}
        assert client.get("/health").status_code == 200
        readiness = client.get("/ready")
        assert readiness.status_code == 503 and readiness.json()["status"] == "restarting"
        refused = client.post("/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 3}})
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        assert refused.json() == {"error": "the generation engine is restarting; retry shortly",
                                  "error_type": "unavailable"}
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=15) == 0


def test_without_an_engine_process_the_model_runs_in_the_server(tiny_checkpoint: Path) -> None:
    with running_server(tiny_checkpoint, "--no-engine-process") as server:
        assert engine_processes(server) == []
        assert len(native_text(server, "CAESAR:", max_new_tokens=12, temperature=0)) == 12


def test_a_float16_kv_cache_reaches_the_engine_process(tiny_checkpoint: Path) -> None:
    """--kv-cache-dtype float16 on a float32 model: /info says so, the start warns that outside the compiled
    CPU step each step converts what it reads, and a seed still writes the same text alone and in a batch."""
    with running_server(tiny_checkpoint, "--kv-cache-dtype", "float16") as server:
        model = httpx.get(f"{server.base_url}/info", timeout=5).json()["model"]
        assert (model["dtype"], model["kv_cache_dtype"]) == ("float32", "float16")
        assert "a float16 KV cache for float32 weights, not in the compiled CPU step" in server.log()
        assert_same_seed_alone_and_among_eight_others(server)


def test_a_bad_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    # In-process (`main` is what `python -m service` runs): sys.exit with a message exits with code 1.
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "missing")])
    assert exit_info.value.code == \
        f"error: cannot serve this checkpoint: {tmp_path / 'missing'}: no checkpoint directory there"
