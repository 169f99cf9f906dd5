"""Faults: a broken checkpoint stops the service at start with one clear line; a decode step that raises
fails only its batch; SIGTERM ends every stream, running or queued; a client that reads very slowly
does not slow the others down.

(The e2e tests already cover a missing checkpoint directory and SIGTERM with one running stream.)
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from gpt.sampling import Sampled
from service import __main__ as service_main
from service.app import create_app
from service.settings import Settings
from tests.server_utils import REPO, free_port, running_server

generate_module = importlib.import_module("gpt.generate")  # the module (gpt.generate is also a function)

LONG = 100_000  # new characters for requests that must still be running when the test acts


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def sse_data(base_url: str, path: str, body: dict, on_open: Callable[[], None] | None = None) -> list[str]:
    """The `data:` payloads of one stream, read to its end (a read timeout, never a hang)."""
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(60, read=20)) as client, \
            client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        if on_open is not None:
            on_open()
        lines = response.iter_lines()
        return [line.removeprefix("data:").strip() for line in lines if line.startswith("data:")]


# --- A checkpoint the service must refuse ----------------------------------------------------------

class PickleBomb:
    """Unpickling this creates `marker`: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def copy_checkpoint(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def edit_config(checkpoint: Path, edit: Callable[[dict], None]) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    edit(config)
    (checkpoint / "config.json").write_text(json.dumps(config))


def rehash(checkpoint: Path) -> None:
    """Record the weights' current sha256, so that only the check after the hash can catch them."""
    from gpt.checkpoint import sha256_file

    edit_config(checkpoint, lambda c: c.update(weights_sha256=sha256_file(checkpoint / "model.safetensors")))


BROKEN_CASES = [
    "weights missing", "weights truncated", "weights truncated, hash updated",
    "config wider than the weights", "config deeper than the weights", "vocabulary shorter than the model's",
    "weights file is a pickle",
    "weights file is a torch.save pickle", "config.json is a pickle", "--checkpoint names a pickle file",
]


def broken_checkpoints(good: Path, root: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """name -> (checkpoint path, a fragment the error line must contain)."""
    bomb = pickle.dumps(PickleBomb(marker))
    cases: dict[str, tuple[Path, str]] = {}

    path = copy_checkpoint(good, root / "no-weights")
    (path / "model.safetensors").unlink()
    cases["weights missing"] = (path, "model.safetensors: missing")

    path = copy_checkpoint(good, root / "truncated")
    weights = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    cases["weights truncated"] = (path, "do not match the sha256")

    path = copy_checkpoint(good, root / "truncated-rehashed")
    (path / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    rehash(path)
    cases["weights truncated, hash updated"] = (path, "not a readable safetensors file")

    path = copy_checkpoint(good, root / "wider")
    edit_config(path, lambda c: c["model"].update(n_embd=2 * c["model"]["n_embd"]))
    cases["config wider than the weights"] = (path, "does not match model.safetensors")

    path = copy_checkpoint(good, root / "deeper")
    edit_config(path, lambda c: c["model"].update(n_layer=c["model"]["n_layer"] + 1))
    cases["config deeper than the weights"] = (path, "does not match model.safetensors")

    path = copy_checkpoint(good, root / "vocab")
    edit_config(path, lambda c: c.update(vocab=c["vocab"][:-1]))
    cases["vocabulary shorter than the model's"] = (path, "vocab_size")

    path = copy_checkpoint(good, root / "pickled-weights")
    (path / "model.safetensors").write_bytes(bomb)
    rehash(path)
    cases["weights file is a pickle"] = (path, "not a readable safetensors file")

    path = copy_checkpoint(good, root / "torch-save")
    state = {"wte.weight": torch.zeros(2, 2), "bomb": PickleBomb(marker)}
    torch.save(state, path / "model.safetensors")
    rehash(path)
    cases["weights file is a torch.save pickle"] = (path, "not a readable safetensors file")

    path = copy_checkpoint(good, root / "pickled-config")
    (path / "config.json").write_bytes(bomb)
    cases["config.json is a pickle"] = (path, "not a valid checkpoint config")

    path = root / "model.pt"
    path.write_bytes(bomb)
    cases["--checkpoint names a pickle file"] = (path, "no checkpoint directory there")
    return cases


@pytest.mark.parametrize("case", BROKEN_CASES)
def test_a_broken_checkpoint_is_refused_with_one_clear_line(case: str, tiny_checkpoint: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "unpickled"
    path, fragment = broken_checkpoints(tiny_checkpoint, tmp_path, marker)[case]
    monkeypatch.setattr(service_main, "configure_logging", lambda level: None)  # keep this process's logging
    with pytest.raises(SystemExit) as stopped:
        service_main.main(["--checkpoint", str(path), "--port", str(free_port())])
    message = stopped.value.code  # a string: Python prints it to stderr and exits with status 1
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith(f"error: cannot serve this checkpoint: {path}") and fragment in message
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # nothing else: no traceback, no log lines
    assert not marker.exists(), "a pickle was unpickled"


def test_a_pickle_for_weights_ends_the_process_with_status_1_and_one_line(tiny_checkpoint: Path,
                                                                          tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    cases = broken_checkpoints(tiny_checkpoint, tmp_path, marker)
    path, fragment = cases["weights file is a torch.save pickle"]
    result = subprocess.run([sys.executable, "-m", "service", "--checkpoint", str(path)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1 and fragment in result.stderr
    assert not marker.exists()


# --- A decode step that raises ---------------------------------------------------------------------

@contextlib.contextmanager
def serve_in_thread(app: object) -> Iterator[str]:
    """uvicorn in a thread of this process, so that the test can reach into the engine."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{base_url}/ready", timeout=1).status_code == 200
            return False

        wait_until(ready)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def test_a_failing_decode_step_fails_only_its_batch_and_the_service_goes_on(
        tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(checkpoint=tiny_checkpoint, max_batch_size=3, max_queue=4, max_new_tokens=LONG,
                        keepalive_s=0.2)
    app = create_app(settings)
    engine = app.state.service.engine
    # The step fails for the batch and for each row alone: no one request's doing. It fails in the
    # sampler, which every step reaches: a row whose window is full takes a prefill, not decode_step,
    # and one that did so while armed used no fault and went on to LONG characters.
    armed, real_sample = threading.Semaphore(0), generate_module.sample_rows

    def sample_or_fail(*args: object, **kwargs: object) -> Sampled:
        if armed.acquire(blocking=False):
            raise RuntimeError("injected step fault")
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(generate_module, "sample_rows", sample_or_fail)
    long_native = {"inputs": "CAESAR:", "parameters": {"max_new_tokens": LONG}}
    long_openai = {"model": "tiny", "prompt": "CAESAR:", "max_tokens": LONG, "stream": True}
    with serve_in_thread(app) as base_url, ThreadPoolExecutor(4) as pool:
        native = pool.submit(sse_data, base_url, "/generate_stream", long_native)
        openai = pool.submit(sse_data, base_url, "/v1/completions", long_openai)
        plain = pool.submit(httpx.post, f"{base_url}/generate", json=long_native, timeout=60)
        wait_until(lambda: engine.running_rows == 3)
        queued = pool.submit(httpx.post, f"{base_url}/generate", timeout=60,
                             json={"inputs": "BRUTUS:", "parameters": {"max_new_tokens": 20}})
        wait_until(lambda: engine.queue_size == 1)
        armed.release(4)  # the step of 3 rows, then each row alone

        native_events = native.result(timeout=60)
        assert len(native_events) >= 2 and "token" in json.loads(native_events[0])
        assert json.loads(native_events[-1]) == {"error": "generation failed: RuntimeError",
                                                 "error_type": "generation"}
        openai_events = openai.result(timeout=60)
        assert openai_events[-1] == "[DONE]"
        assert json.loads(openai_events[-2])["error"]["type"] == "server_error"
        plain_response = plain.result(timeout=60)
        assert plain_response.status_code == 500
        assert plain_response.json()["error_type"] == "generation"
        # Not in the failed batch: it waited for a row, and got one when the batch's rows came back.
        queued_response = queued.result(timeout=60)
        assert queued_response.status_code == 200 and len(queued_response.json()["generated_text"]) == 20

        assert httpx.get(f"{base_url}/health").status_code == 200
        assert httpx.get(f"{base_url}/ready").status_code == 200
        after = httpx.post(f"{base_url}/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 5}})
        assert after.status_code == 200 and len(after.json()["generated_text"]) == 5
        wait_until(lambda: engine.running_rows == 0 and engine.queue_size == 0)


# --- SIGTERM with streams running and queued -------------------------------------------------------

@pytest.mark.slow
def test_sigterm_ends_running_and_queued_requests_of_both_apis(tiny_checkpoint: Path) -> None:
    options = ("--max-batch-size", "2", "--drain-timeout-s", "1", "--keepalive-s", "0.3",
               "--max-new-tokens", str(LONG))
    long_native = {"inputs": "a", "parameters": {"max_new_tokens": LONG}}
    long_openai = {"model": "tiny", "prompt": "a", "max_tokens": LONG, "stream": True}
    with running_server(tiny_checkpoint, *options) as server, ThreadPoolExecutor(4) as pool:
        base = server.base_url

        def state() -> dict:
            return httpx.get(f"{base}/ready", timeout=5).json()

        running_native = pool.submit(sse_data, base, "/generate_stream", long_native)
        running_openai = pool.submit(sse_data, base, "/v1/completions", long_openai)
        wait_until(lambda: state()["running"] == 2)
        queued_opened = threading.Event()
        queued_stream = pool.submit(sse_data, base, "/generate_stream", long_native, queued_opened.set)
        queued_plain = pool.submit(httpx.post, f"{base}/generate", json=long_native, timeout=60)
        wait_until(lambda: state()["queue"] == 2 and queued_opened.is_set())

        server.process.send_signal(signal.SIGTERM)
        # Nothing can finish within the grace period: every request is ended, none is left hanging.
        assert json.loads(running_native.result(timeout=30)[-1])["error_type"] == "unavailable"
        openai_events = running_openai.result(timeout=30)
        assert openai_events[-1] == "[DONE]"
        # The code the JSON answer to the same failure carries.
        assert json.loads(openai_events[-2])["error"]["code"] == "shutdown"
        assert json.loads(queued_stream.result(timeout=30)[-1])["error_type"] == "unavailable"
        refused = queued_plain.result(timeout=30)
        assert refused.status_code == 503 and refused.headers["retry-after"].isdigit()
        assert server.process.wait(timeout=20) == 0


# --- A client that reads very slowly ---------------------------------------------------------------

class SlowReader:
    """A raw-socket client with a tiny receive window that reads a few bytes now and then, so that
    the server's writes to it back up."""

    def __init__(self, base_url: str, body: dict) -> None:
        host, port = base_url.removeprefix("http://").split(":")
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # before connect: sets the window
        self.sock.connect((host, int(port)))
        payload = json.dumps(body).encode()
        self.sock.sendall(b"POST /generate_stream HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(payload), payload))
        self.received = b""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        while not self.stop.is_set():
            self.received += self.sock.recv(16)
            time.sleep(0.05)

    def read_rest(self) -> bytes:
        self.stop.set()
        self.thread.join()
        self.sock.settimeout(30)
        while not self.received.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's last chunk
            chunk = self.sock.recv(1 << 16)
            assert chunk, "the server closed the stream early"
            self.received += chunk
        self.sock.close()
        return self.received


def dechunk(body: bytes) -> bytes:
    """The payload of an HTTP/1.1 chunked body."""
    payload = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return payload
        payload, body = payload + body[:size], body[size + 2:]


def stream_rate(base_url: str, max_new_tokens: int) -> float:
    """Characters per second of one stream, from its first event to its last."""
    body = {"inputs": "CAESAR:", "parameters": {"max_new_tokens": max_new_tokens, "seed": 1}}
    times = []
    with httpx.Client(base_url=base_url, timeout=60) as client, \
            client.stream("POST", "/generate_stream", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                times.append(time.perf_counter())
    assert len(times) == max_new_tokens
    return (len(times) - 1) / (times[-1] - times[0])


def read_until(base_url: str, done: threading.Event) -> None:
    """A client reading a long stream at full speed until `done`, then hanging up."""
    body = {"inputs": "a", "parameters": {"max_new_tokens": LONG}}
    with httpx.Client(base_url=base_url, timeout=60) as client, \
            client.stream("POST", "/generate_stream", json=body) as response:
        for _ in response.iter_lines():
            if done.is_set():
                return


@pytest.mark.slow
def test_a_slow_reader_does_not_stall_the_other_rows(tiny_checkpoint: Path) -> None:
    # ~190 kB of events for the slow reader: far more than its receive window and the socket buffers.
    probe_chars, slow_chars = 300, 2000
    with running_server(tiny_checkpoint, "--max-batch-size", "4", "--max-new-tokens", str(LONG),
                        "--log-level", "warning") as server:
        stream_rate(server.base_url, 50)  # warm-up
        # Control: the probe next to a client that reads at full speed.
        with ThreadPoolExecutor(1) as pool:
            probe_done = threading.Event()
            other = pool.submit(read_until, server.base_url, probe_done)
            normal = stream_rate(server.base_url, probe_chars)
            probe_done.set()
            other.result(timeout=60)
        slow = SlowReader(server.base_url, {"inputs": "BRUTUS:", "parameters": {"max_new_tokens": slow_chars,
                                                                                  "seed": 2}})
        wait_until(lambda: b"data:" in slow.received)
        beside_slow = stream_rate(server.base_url, probe_chars)
        assert not slow.received.endswith(b"\r\n0\r\n\r\n")  # still reading while the probe ran
        raw = slow.read_rest()
        assert server.process.poll() is None
    # Backed up, not lost: the slow reader gets every character, in order.
    body = dechunk(raw.partition(b"\r\n\r\n")[2])
    events = [json.loads(line.removeprefix(b"data:")) for line in body.split(b"\n")
              if line.startswith(b"data:")]
    assert len(events) == slow_chars
    assert "".join(e["token"]["text"] for e in events) == events[-1]["generated_text"]
    print(f"probe chars/s next to a normal reader {normal:.0f}, next to a slow reader {beside_slow:.0f}")
    # A stall would be ~0 (or a timeout); the bound leaves room for a shared, noisy machine.
    assert beside_slow > 0.3 * normal
