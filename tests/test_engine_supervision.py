"""Engine supervision against the real engine process and a real (tiny) model, in the default
two-process mode: SIGKILL of the engine process under load fails only the requests in flight (503 with
Retry-After, or an `error` event), /ready turns 503 and back to 200, the next requests succeed and
/metrics counts the restart; restarts that keep failing end the server with a non-zero status; an
engine that does not load in time, or whose first warm-up fails, ends it with one clear line. A
non-streamed request's events cross the pipe in one message. And the engine process's Outbox: its
messages reach the other end in order, packed, all of them by close().

Faults inside the engine process are injected by a `sitecustomize` module on PYTHONPATH (written by
`fault_env`), which every Python process of the server imports at start: nothing in the service
knows about it.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from gpt import SamplingParams
from service.engine import Failed, Finished, GenerationRequest, TextChunk, TokenLogprob
from service.engine_process import EngineProcess, Outbox, unpack_events, usable_cpus
from service.settings import Settings
from tests.server_utils import REPO, ServerProcess, free_port, metric_value, running_server
from tests.test_engine import outcome, run

LONG = 100_000  # new characters for requests that must still be running when the engine dies
SEEDED = {"inputs": "CAESAR:", "parameters": {"max_new_tokens": 24, "seed": 7, "temperature": 0.9}}

HOOK = '''
# Patches service.engine when (and only if) a process imports it, so that the processes that never do
# (multiprocessing's resource tracker) start as fast as ever.
import importlib.abc
import importlib.machinery
import os
import pathlib
import sys
import time

FAULT = os.environ.get("CAESAR_TEST_ENGINE_FAULT")


def inject(engine_module):
    Engine = engine_module.Engine
    if FAULT == "hang-loading":
        def from_settings(cls, *args, **kwargs):
            pathlib.Path(os.environ["CAESAR_TEST_PID_FILE"]).write_text(str(os.getpid()))
            time.sleep(3600)
        Engine.from_settings = classmethod(from_settings)
    elif FAULT == "fail-warm-up":
        def _warm_up(self):
            raise RuntimeError("injected warm-up fault")
        Engine._warm_up = _warm_up


class Injector(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "service.engine":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            inject(module)

        spec.loader.exec_module = exec_module
        return spec


if FAULT:
    sys.meta_path.insert(0, Injector())
'''


def fault_env(tmp_path: Path, fault: str) -> dict[str, str]:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOOK)
    return {"PYTHONPATH": os.pathsep.join([str(hooks), str(REPO)]), "CAESAR_TEST_ENGINE_FAULT": fault,
            "CAESAR_TEST_PID_FILE": str(tmp_path / "engine.pid"), "OMP_NUM_THREADS": "1",
            "CAESAR_THREADS": "1"}


def wait_until(condition: Callable[[], bool], timeout_s: float = 60.0, interval_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(interval_s)


def engine_process(server: ServerProcess) -> psutil.Process:
    """The server's child that runs the engine (multiprocessing also starts a resource tracker)."""
    (engine,) = [child for child in psutil.Process(server.process.pid).children()
                 if "spawn_main" in " ".join(child.cmdline())]
    return engine


def sse_data(base_url: str, path: str, body: dict) -> list[str]:
    """The `data:` payloads of one stream, read to its end."""
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(60, read=30)) as client, \
            client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()
        return [line.removeprefix("data:").strip() for line in lines if line.startswith("data:")]


def post(base_url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", json=body, timeout=60)


def test_sigkill_of_the_engine_under_load_fails_only_the_requests_in_flight(tiny_checkpoint: Path) -> None:
    options = ("--max-batch-size", "4", "--max-new-tokens", str(LONG), "--keepalive-s", "0.2")
    native_long = {"inputs": "a", "parameters": {"max_new_tokens": LONG}}
    openai_long = {"model": "tiny", "prompt": "a", "max_tokens": LONG}
    with running_server(tiny_checkpoint, *options) as server, ThreadPoolExecutor(6) as pool:
        base = server.base_url
        before = post(base, "/generate", SEEDED)
        assert before.status_code == 200
        first_engine = engine_process(server)

        def state() -> dict:
            return httpx.get(f"{base}/ready", timeout=5).json()

        in_flight = {
            "native stream": pool.submit(sse_data, base, "/generate_stream", native_long),
            "openai stream": pool.submit(sse_data, base, "/v1/completions", {**openai_long, "stream": True}),
            "native json": pool.submit(post, base, "/generate", native_long),
            "openai json": pool.submit(post, base, "/v1/completions", openai_long),
        }
        wait_until(lambda: state()["running"] == 4)
        in_flight["queued json"] = pool.submit(post, base, "/generate", native_long)
        wait_until(lambda: state()["queue"] == 1)

        first_engine.kill()

        native_events = in_flight["native stream"].result(timeout=30)
        assert len(native_events) >= 2 and "token" in json.loads(native_events[0])  # it had started
        assert json.loads(native_events[-1])["error_type"] == "unavailable"
        assert "restarting" in json.loads(native_events[-1])["error"]
        openai_events = in_flight["openai stream"].result(timeout=30)
        assert openai_events[-1] == "[DONE]"
        openai_error = json.loads(openai_events[-2])["error"]
        assert openai_error["code"] in ("engine_restart", "unavailable")
        assert "restarting" in openai_error["message"]
        for name in ("native json", "queued json"):
            response = in_flight[name].result(timeout=30)
            assert response.status_code == 503, (name, response.text)
            assert response.headers["retry-after"].isdigit()
            assert response.json()["error_type"] == "unavailable"
        response = in_flight["openai json"].result(timeout=30)
        assert response.status_code == 503 and response.headers["retry-after"].isdigit()
        assert response.json()["error"]["code"] == "engine_restart"

        # Restarting: not ready, but alive; new requests are refused with Retry-After.
        ready = httpx.get(f"{base}/ready", timeout=5)
        assert ready.status_code == 503 and ready.headers["retry-after"].isdigit()
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200
        refused = post(base, "/generate", SEEDED)
        assert refused.status_code == 503 and refused.headers["retry-after"].isdigit()

        wait_until(lambda: httpx.get(f"{base}/ready", timeout=5).status_code == 200, interval_s=0.1)
        assert engine_process(server).pid != first_engine.pid
        after = post(base, "/generate", SEEDED)
        assert after.status_code == 200 and after.json()["generated_text"] == before.json()["generated_text"]
        completion = post(base, "/v1/completions", {"model": "tiny", "prompt": "BRUTUS:", "max_tokens": 8})
        assert completion.status_code == 200 and len(completion.json()["choices"][0]["text"]) == 8
        stream = sse_data(base, "/generate_stream", {"inputs": "a", "parameters": {"max_new_tokens": 5}})
        assert json.loads(stream[-1])["details"]["generated_tokens"] == 5

        metrics = httpx.get(f"{base}/metrics", timeout=5).text
        assert metric_value(metrics, "caesar_engine_restarts_total") == 1
        assert metric_value(metrics, "caesar_engine_restart_failures_total") == 0
        assert metric_value(metrics, "caesar_engine_start_seconds") > 0
        wait_until(lambda: state()["running"] == 0 and state()["queue"] == 0)
    log = server.log()
    assert log.count("the engine process died (killed by SIGKILL); 5 requests in flight failed") == 1, log
    assert "the engine process restarted: ready in" in log
    assert server.process.returncode == 0  # and it still stops cleanly on SIGTERM


def test_restarts_that_keep_failing_end_the_server_with_a_non_zero_status(tiny_checkpoint: Path,
                                                                          tmp_path: Path) -> None:
    checkpoint = tmp_path / "tiny"
    shutil.copytree(tiny_checkpoint, checkpoint)
    with running_server(checkpoint, "--log-level", "warning") as server:
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])  # every restart now fails to load it
        engine_process(server).kill()
        wait_until(lambda: httpx.get(f"{server.base_url}/ready", timeout=5).status_code == 503)
        assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200  # still trying
        assert server.process.wait(timeout=90) == 1
    lines = server.log().splitlines()
    assert "engine restart 1 of 3 failed" in server.log() and "engine restart 2 of 3 failed" in server.log()
    assert lines[-1].startswith("error: the engine process failed to restart 3 times in a row (last: ")
    assert "do not match the sha256" in lines[-1]


def run_service(tiny_checkpoint: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "service", "--checkpoint", str(tiny_checkpoint), "--port",
               str(free_port()), "--log-level", "warning", *args]
    return subprocess.run(command, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


def test_an_engine_that_does_not_load_in_time_ends_the_server(tiny_checkpoint: Path, tmp_path: Path) -> None:
    env = fault_env(tmp_path, "hang-loading")
    result = run_service(tiny_checkpoint, env, "--engine-load-timeout-s", "6")
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == \
        "error: the engine process did not load the checkpoint within 6 s (engine_load_timeout_s)"
    pid_file = tmp_path / "engine.pid"
    if pid_file.exists():  # the engine process hung in its load (else: still importing, on a slow machine)
        pid = int(pid_file.read_text())
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # killed


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("engine_process", [True, False], ids=["engine process", "one process"])
def test_cuda_asked_for_without_cuda_ends_the_server(tiny_checkpoint: Path, engine_process: bool) -> None:
    mode = "--engine-process" if engine_process else "--no-engine-process"
    result = run_service(tiny_checkpoint, {}, mode, "--device", "cuda")
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1].endswith("device 'cuda' was asked for, but CUDA is not available")


@pytest.mark.parametrize("engine_process", [True, False], ids=["engine process", "one process"])
def test_a_failing_first_warm_up_ends_the_server(tiny_checkpoint: Path, tmp_path: Path,
                                                  engine_process: bool) -> None:
    env = fault_env(tmp_path, "fail-warm-up")
    mode = "--engine-process" if engine_process else "--no-engine-process"
    result = run_service(tiny_checkpoint, env, mode)
    assert result.returncode == 1, result.stderr
    if engine_process:
        expected = "error: the engine could not start: the engine process failed its warm-up: "
    else:
        expected = "error: the engine's scheduler thread died: "
    assert result.stderr.splitlines()[-1] == expected + "RuntimeError: injected warm-up fault", result.stderr


def test_a_final_only_request_crosses_the_pipe_once(tiny_checkpoint: Path) -> None:
    """In the real engine process, a non-streamed request's events reach the parent in one message,
    with its end; a streamed twin's come step by step, with the same text."""
    engine = EngineProcess(Settings(checkpoint=tiny_checkpoint, threads=1, max_batch_size=4))
    dispatches: Counter[int] = Counter()  # the parent's dispatches that carried each request's events
    dispatch = engine._dispatch

    def recording(items: list) -> None:
        dispatches.update(request_id for request_id, _ in items)
        dispatch(items)

    engine._dispatch = recording
    streamed = GenerationRequest(engine.tokenizer.encode("BRUTUS:"), 40,
                                 SamplingParams(temperature=0.9, seed=5))
    final_only = dataclasses.replace(streamed, final_only=True)

    async def both() -> list[tuple[str, Finished | Failed]]:
        handles = [engine.submit(streamed), engine.submit(final_only)]
        return [await outcome(handle) for handle in handles]

    engine.start()
    try:
        wait_until(lambda: engine.ready)
        (streamed_text, streamed_end), (final_text, final_end) = run(both())
    finally:
        engine.shutdown()
    assert isinstance(streamed_end, Finished) and isinstance(final_end, Finished)
    streamed_id, final_id = sorted(dispatches)
    assert dispatches[streamed_id] > 20 and dispatches[final_id] == 1
    assert final_text == streamed_text and len(final_text) == 40


def test_the_outbox_writes_in_order_packed_and_everything_by_close():
    reader, writer = multiprocessing.Pipe(duplex=False)
    outbox = Outbox(writer)
    plain, scored = TextChunk("a", 1.5), TextChunk("b", 1.5, TokenLogprob(3, -0.25, ((3, -0.25),)))
    finished = Finished("length", 2, 7, 3, False, 3, 0.0, 0.1, 0.2)
    outbox.send(("loaded", {"context": 64}))
    for step in range(50):
        outbox.send(("events", [(step, [plain, scored]), (step + 1000, [finished]), (step + 2000, [plain])],
                     (0, 2)))
    outbox.close()
    assert not outbox.alive
    assert reader.recv() == ("loaded", {"context": 64})
    for step in range(50):
        kind, items, state = reader.recv()
        assert (kind, state) == ("events", (0, 2))
        assert [request_id for request_id, _ in items] == [step, step + 1000, step + 2000]
        assert items[0][1] == [("a", 1.5), scored]  # a plain chunk crosses as a tuple
        assert items[2][1] == ("a", 1.5)  # and a delivery of that chunk alone as the tuple itself
        assert [unpack_events(packed) for _, packed in items] == [[plain, scored], [finished], [plain]]
    assert not reader.poll()


def test_an_outbox_that_cannot_send_stops_so_the_engine_process_ends():
    reader, writer = multiprocessing.Pipe(duplex=False)
    outbox = Outbox(writer)
    outbox.send(("loaded", lambda: None))  # cannot be pickled
    outbox.thread.join(timeout=10)
    assert not outbox.alive and not reader.poll()


@pytest.mark.parametrize(("cpu_max", "expected"),
                         [("max 100000", None), ("50000 100000", 1), ("150000 100000", 2), ("garbled", None)])
def test_the_engine_threads_default_stays_within_a_container_cpu_quota(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_max: str, expected: int | None) -> None:
    """The engine takes every usable CPU by default: a quota (`docker run --cpus`) caps them, rounded up."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    monkeypatch.setattr("service.engine_process.CGROUP_CPU_MAX", tmp_path / "absent")
    assert usable_cpus() == affinity
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    monkeypatch.setattr("service.engine_process.CGROUP_CPU_MAX", tmp_path / "cpu.max")
    assert usable_cpus() == (affinity if expected is None else min(expected, affinity))
