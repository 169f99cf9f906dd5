"""Helpers for tests of the service: a real `python -m service` on a loopback port, and a FakeEngine
that stands in for the model behind `create_app(settings, engine=fake)`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from gpt import CharTokenizer
from service.app import create_app
from service.engine import (
    Admitted,
    EngineUnavailable,
    Failed,
    Finished,
    GenerationRequest,
    QueueFull,
    RequestHandle,
    TextChunk,
)
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    base_url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def running_server(checkpoint: Path | str, *args: str, env: dict[str, str] | None = None,
                   ready_timeout_s: float = 120.0) -> Iterator[ServerProcess]:
    """Start `python -m service` on a free loopback port, wait for /ready, yield it, then stop it
    (SIGTERM, then SIGKILL if it does not exit within 15 s)."""
    port = free_port()
    command = [sys.executable, "-m", "service", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
               "--port", str(port), *args]
    # One thread each: tests may run several servers on a 2-core machine.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CAESAR_THREADS": "1", **(env or {})}
    log_file = tempfile.NamedTemporaryFile(prefix="caesar-server-", suffix=".log", delete=False)
    process = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    server = ServerProcess(f"http://127.0.0.1:{port}", process, Path(log_file.name))
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{server.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.base_url}/ready", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not ready within {ready_timeout_s} s:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log_file.close()


def metric_value(metrics_text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text, e.g. `caesar_running_rows`."""
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


@dataclass
class FakeEngine:
    """An EngineLike without a model: each request "generates" `text` (cut to max_new_tokens, ended by
    its first stop string), one character per `step_s`, as events on the submitting event loop.

    Knobs: `refuse` is raised by submit (QueueFull, EngineUnavailable); `admission_delay_s` keeps a
    request queued; `queue_failure` is delivered instead of admission; `fail_after` characters, a
    `generation` failure. `requests` and `cancelled` record what happened.
    """

    tokenizer: CharTokenizer
    text: str = "Friends, Romans, countrymen, lend me your ears"
    step_s: float = 0.0
    refuse: Exception | None = None
    admission_delay_s: float = 0.0
    queue_failure: Failed | None = None
    fail_after: int | None = None
    context: int = 64
    ready: bool = True
    draining: bool = False
    restarting: bool = False
    alive: bool = True
    queue_size: int = 0
    running_rows: int = 0
    requests: list[GenerationRequest] = field(default_factory=list)
    cancelled: list[GenerationRequest] = field(default_factory=list)
    started: bool = False

    def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.started = False

    async def drain(self, timeout_s: float) -> None:
        self.draining = True

    def model_card(self) -> dict[str, Any]:
        return {"preset": "fake", "parameters": 0, "layers": 0, "heads": 0, "width": 0,
                "context": self.context, "vocab_size": self.tokenizer.vocab_size,
                "vocab": self.tokenizer.chars, "device": "cpu", "dtype": "float32"}

    def submit(self, request: GenerationRequest) -> RequestHandle:
        if self.refuse is not None:
            raise self.refuse
        self.requests.append(request)
        handle = RequestHandle()
        asyncio.get_running_loop().create_task(self._play(request, handle))
        return handle

    async def _play(self, request: GenerationRequest, handle: RequestHandle) -> None:
        started = time.perf_counter()
        await asyncio.sleep(self.admission_delay_s)
        if self.queue_failure is not None:
            handle.events.put_nowait(self.queue_failure)
            return
        handle.events.put_nowait(Admitted(time.perf_counter() - started))
        text, reason = self.text[:request.max_new_tokens], "length"
        for stop in request.stop:
            if stop in text:
                text, reason = text[:text.index(stop)], "stop"
        for index, char in enumerate(text):
            await asyncio.sleep(self.step_s)
            if handle.cancelled:
                self.cancelled.append(request)
                return
            if self.fail_after is not None and index == self.fail_after:
                handle.events.put_nowait(Failed("generation", "generation failed: RuntimeError"))
                return
            handle.events.put_nowait(TextChunk(char, time.perf_counter()))
        total = time.perf_counter() - started
        handle.events.put_nowait(Finished(
            finish_reason=reason, generated_tokens=len(text), seed=request.params.seed or 0,
            input_length=len(request.prompt_ids), truncated=False, last_token_id=None, queue_s=0.0,
            time_to_first_token_s=total / max(len(text), 1), total_s=total))


__all__ = ["EngineUnavailable", "FakeEngine", "QueueFull", "ServerProcess", "free_port", "metric_value",
           "running_server"]


MakeClient = Callable[..., TestClient]


def app_clients(engine_type: Callable[..., Any], tokenizer: CharTokenizer,
                checkpoint: Path) -> Iterator[MakeClient]:
    """For a fixture to yield from: make(engine options..., settings=dict(...)) -> a TestClient over
    the app with an `engine_type` engine (`client.engine`); every client is closed afterwards."""
    clients = []

    def make(settings: dict | None = None, **engine_options: object) -> TestClient:
        engine = engine_type(tokenizer, **engine_options)
        client = TestClient(create_app(Settings(checkpoint=checkpoint, **(settings or {})), engine=engine))
        client.__enter__()
        client.engine = engine
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
