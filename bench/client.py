"""The benchmarks' HTTP load client: lean enough that it is not what it measures.

bench/serving.py used to drive the servers with aiohttp in the benchmark's own process: a
`StreamReader` line iterator and a `json.loads` for every streamed character, on the same 2 cores
as the server it measures. This client instead

- runs in a process of its own (`ClientProcess`: `python -m bench.client`, which imports no torch,
  no aiohttp, nothing outside the standard library), so nothing else in the benchmark's process
  (a model, a thread pool) competes with it, and its CPU time is its own;
- opens a fixed pool of keep-alive HTTP/1.1 connections before the clock starts, one per
  concurrent client, and sends that client's requests one after the other on it: no connection
  set-up is timed;
- is one thread and one `selectors` loop over non-blocking sockets (no asyncio: no futures, callbacks
  or stream reader per read): it decodes the chunked framing and counts Server-Sent Events by
  counting `\\ndata:` in the raw bytes, with no JSON parsing per event; the last event of a stream
  (or a plain JSON body) is parsed once, to check the number of characters against the server's
  `generated_text`.

It reports, besides the timings, the CPU time it used over the timed window (process CPU time /
wall time, as a fraction of one core), so a benchmark can say what its own client cost.

    python -m bench.client            # a worker: one JSON load spec per stdin line, one result line out
"""

from __future__ import annotations

import json
import selectors
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Response:
    status: int
    sent_s: float  # time.perf_counter() when the request was written
    first_event_s: float | None  # first data event (SSE), or the whole body (plain JSON)
    end_s: float
    events: int  # SSE data events (0 for a plain JSON response)
    chars: int  # characters generated, from the server's own generated_text
    body_tail: str = ""  # the last event or the JSON body (errors and checks)


@dataclass
class Record:
    """One request as the benchmarks read it."""

    first_char_s: float
    total_s: float
    chars: int


@dataclass
class LoadResult:
    requests: list[Record]
    wall_s: float
    client_cpu_s: float = 0.0  # the client's process CPU time over the timed window
    failures: list[str] = field(default_factory=list)

    @property
    def requests_per_s(self) -> float:
        return len(self.requests) / self.wall_s

    @property
    def chars_per_s(self) -> float:
        return sum(r.chars for r in self.requests) / self.wall_s

    @property
    def client_cpu(self) -> float:
        """The client's CPU time over wall time: the fraction of one core it used."""
        return self.client_cpu_s / self.wall_s if self.wall_s else 0.0


class Connection:
    """One keep-alive HTTP/1.1 connection (a non-blocking socket): one request at a time, its response
    parsed as the bytes arrive."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.closed = False

    def send(self, raw: bytes) -> None:
        """Start a request: reset the parser, write the request (small: the socket buffer takes it)."""
        self.reused = hasattr(self, "raw")
        self.raw = raw
        self._buffer = bytearray()
        self._head: tuple[int, int | None, bool, bool] | None = None  # status, length, chunked, close
        self._body_parts: list[bytes] = []
        self._body_len = 0
        self._tail = b"\n"  # the body's last bytes so far, for an event split across two reads
        self._events = 0
        self._first: float | None = None
        self.sent = time.perf_counter()
        self.sock.setblocking(True)
        self.sock.sendall(raw)
        self.sock.setblocking(False)

    def feed(self, data: bytes, now: float) -> Response | None:
        """The bytes just read; the response once it is complete."""
        if not data:
            self.closed = True
            if self.reused and self._head is None and not self._buffer:
                raise StaleConnection()
            raise ConnectionError("the server closed the connection mid-response")
        self._buffer += data
        buf = self._buffer
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return None
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip().lower()
            length = int(headers["content-length"]) if "content-length" in headers else None
            chunked = "chunked" in headers.get("transfer-encoding", "")
            close = headers.get("connection") == "close"
            self._head = (int(lines[0].split(" ", 2)[1]), length, chunked, close)
            del buf[:end + 4]
        _, length, chunked, _ = self._head
        if not chunked:
            if buf:
                self._body(bytes(buf), now)
                buf.clear()
            return self._finish(now) if length is not None and self._body_len >= length else None
        # Chunked: take every whole chunk in the buffer (a streamed event is usually one chunk, one read).
        pos = 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
            if size == 0:  # the last chunk, then no trailers: an empty line
                if len(buf) < eol + 4:
                    break
                del buf[:eol + 4]
                return self._finish(now)
            if len(buf) < eol + 2 + size + 2:
                break
            self._body(bytes(buf[eol + 2:eol + 2 + size]), now)
            pos = eol + 2 + size + 2
        if pos:
            del buf[:pos]
        return None

    def _body(self, data: bytes, now: float) -> None:
        self._body_parts.append(data)
        self._body_len += len(data)
        joined = self._tail + data
        events = joined.count(b"\ndata:")
        self._tail = joined[-5:]
        if events:
            self._events += events
            if self._first is None:
                self._first = now

    def _finish(self, now: float) -> Response:
        status, _, _, close = self._head
        body = b"".join(self._body_parts)
        chars, tail = 0, body[-2000:]
        if self._events:  # SSE: the last data event carries generated_text (TGI's) or an error
            tail = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
            payload = tail.removeprefix(b"data:").strip()
            if payload.startswith(b"{"):
                text = json.loads(payload).get("generated_text")
                chars = len(text) if isinstance(text, str) else self._events
        elif status == 200 and body.startswith(b"{"):
            text = json.loads(body).get("generated_text")
            chars = len(text) if isinstance(text, str) else 0
        if close:
            self.close()
        first = self._first if self._first is not None else now
        return Response(status, self.sent, first, now, self._events, chars, tail.decode("utf-8", "replace"))

    def close(self) -> None:
        self.closed = True
        self.sock.close()


class StaleConnection(ConnectionError):
    """A kept-alive connection the server had closed: no byte of the response came. As HTTP clients
    do, the request is sent again on a new connection."""


def build_request(host: str, port: int, path: str, body: dict[str, Any] | str) -> bytes:
    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: */*\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


def run_load(url: str, path: str, bodies: list[Any], clients: int, check_chars: int | None = None,
             timeout_s: float = 1800.0) -> LoadResult:
    """`clients` concurrent clients over a fixed pool of keep-alive connections (opened before the
    clock starts); client k sends bodies k, k + clients, ... one after the other. One thread, one
    `selectors` loop: a read wakes it, the bytes go to their connection's parser, a finished response
    sends that client's next request. A response that is not a 200, or whose character count is not
    `check_chars`, is a failure (and no record)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    raws = [build_request(host, port, path, body) for body in bodies]
    queues = [raws[k::clients] for k in range(clients)]
    pool = [Connection(host, port) for k in range(clients) if queues[k]]
    queues = [q for q in queues if q]
    records: list[Record] = []
    failures: list[str] = []
    selector = selectors.DefaultSelector()
    next_index = [0] * len(pool)
    cpu, start = time.process_time(), time.perf_counter()
    for k, connection in enumerate(pool):
        selector.register(connection.sock, selectors.EVENT_READ, k)
        connection.send(queues[k][0])
        next_index[k] = 1

    def reconnect(k: int) -> Connection:
        """Client k's closed connection replaced by a new one."""
        selector.unregister(pool[k].sock)
        pool[k].close()
        pool[k] = Connection(host, port)
        selector.register(pool[k].sock, selectors.EVENT_READ, k)
        return pool[k]

    busy = len(pool)
    deadline = start + timeout_s
    while busy:
        ready = selector.select(timeout=max(0.0, deadline - time.perf_counter()))
        if not ready:
            raise TimeoutError(f"{busy} requests still running after {timeout_s:g} s")
        now = time.perf_counter()
        for key, _ in ready:
            k = key.data
            connection = pool[k]
            try:
                response = connection.feed(connection.sock.recv(262144), now)
            except BlockingIOError:
                continue
            except StaleConnection:
                reconnect(k).send(connection.raw)
                continue
            if response is None:
                continue
            if response.status != 200 or (check_chars is not None and response.chars != check_chars):
                failures.append(f"status {response.status}, {response.chars} chars: "
                                f"{response.body_tail[:300]}")
            else:
                records.append(Record(response.first_event_s - response.sent_s,
                                      response.end_s - response.sent_s, response.chars))
            if next_index[k] < len(queues[k]):
                if connection.closed:  # the server asked to close: a new connection for the rest
                    connection = reconnect(k)
                connection.send(queues[k][next_index[k]])
                next_index[k] += 1
            else:
                busy -= 1
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    for connection in pool:
        if not connection.closed:
            selector.unregister(connection.sock)
            connection.close()
    selector.close()
    return LoadResult(records, wall, cpu, failures)


class ClientProcess:
    """The load client in a process of its own (`python -m bench.client`), kept for many loads."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "bench.client"], cwd=REPO,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def load(self, url: str, path: str, bodies: list[Any], clients: int,
             check_chars: int | None = None) -> LoadResult:
        spec = {"url": url, "path": path, "bodies": bodies, "clients": clients, "check_chars": check_chars}
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the client process exited with {self.process.wait()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the client process failed: {reply['error']}")
        return LoadResult([Record(**r) for r in reply["requests"]], reply["wall_s"], reply["client_cpu_s"],
                          reply["failures"])

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> ClientProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def worker() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        spec = json.loads(line)
        try:
            result = run_load(spec["url"], spec["path"], spec["bodies"], spec["clients"],
                              spec.get("check_chars"))
            reply = asdict(result)
        except Exception as error:  # reported to the parent, which raises it
            reply = {"error": f"{type(error).__name__}: {error}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    worker()
