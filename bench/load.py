"""Load test: many concurrent clients against a real `python -m service` on loopback, bounded in
requests and in time.

    .venv/bin/python -m bench.load --quick                   # 16 clients, 10 s, 8 rows + 8 queued
    .venv/bin/python -m bench.load --clients 64 --duration 60  # the record: default server limits

Each client loops: it picks a route (native JSON, native SSE, OpenAI JSON, OpenAI SSE), random
sampling settings and a random prompt from the play, sends, and checks the answer: the length asked
for unless a stop string was given, and a stream's characters must concatenate to its final text. A
share of the streams is hung up on mid-stream. Every `burst_every_s` a burst of
`max_batch_size + max_queue + burst_extra` short requests arrives at once on top of the clients, so
some must be refused. Clients honour Retry-After, as well-behaved ones do; bursts do not retry.

  completed     a 200 whose body is whole and consistent
  disconnected  streams this script hung up on, on purpose (the server must free their rows)
  refused       429 or 503 carrying Retry-After: the only refusals allowed
  failed        anything else: another status, a refusal without Retry-After, an error event, a
                broken or inconsistent body, a transport error, a timeout. Must be 0.

Printed: those counts; time to first character (streams, client side) and inter-character latency
(between consecutive streamed events) p50/p99; the server's resident memory (its processes together)
when ready, after the warm-up part of the run and after the run; the rows and queue entries it
still holds after the run (from /metrics; must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import (
    SHIPPED_CHECKPOINT,
    Table,
    base_parser,
    command_line,
    corpus_text,
    machine_line,
    percentile,
    random_checkpoint,
    write_section,
)

MIB = 1 << 20
KEEPALIVE_EXPIRY_S = 2.0
MAX_PROMPT_CHARS = 200
STOP_CHOICES: list[list[str]] = [[], [], [], ["\n\n"], ["the", "CAESAR"], ["."]]


@dataclass(frozen=True)
class LoadConfig:
    clients: int = 64
    duration_s: float = 60.0  # no request starts after this; those in flight may finish
    max_requests: int = 50_000  # nor after this many (bursts included)
    stream_share: float = 0.6
    disconnect_share: float = 0.15  # of streamed requests, hung up on after a few events
    max_new_tokens: int = 96  # each request asks for 1..this many characters
    burst_every_s: float = 10.0
    burst_extra: int = 8  # a burst is max_batch_size + max_queue + this many requests
    warmup_share: float = 0.1  # resident memory is sampled again this far into the run
    request_timeout_s: float = 120.0
    seed: int = 0


@dataclass(frozen=True)
class Shot:
    """One request to send and what its answer must look like."""

    path: str
    body: dict[str, Any]
    stream: bool
    openai: bool
    max_new: int
    has_stop: bool
    hang_up_after: int | None = None  # streamed events to read before closing the connection


@dataclass
class LoadReport:
    sent: int = 0
    completed: int = 0
    disconnected: int = 0
    refused: Counter[int] = field(default_factory=Counter)  # by status; all carried Retry-After
    failed: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # why, for the message
    ttfc_s: list[float] = field(default_factory=list)
    inter_char_s: list[float] = field(default_factory=list)
    chars: int = 0
    wall_s: float = 0.0
    burst_size: int = 0
    bursts: int = 0
    rss_ready: int = 0
    rss_warm: int = 0
    rss_after: int = 0
    rows_after: float = math.nan
    queue_after: float = math.nan
    server_disconnects: float = math.nan

    def fail(self, why: str) -> None:
        self.failed += 1
        self.failures[why[:160]] += 1

    @property
    def rss_growth(self) -> int:
        """Resident memory gained between the end of the warm-up and the end of the run."""
        return self.rss_after - self.rss_warm

    def table(self) -> str:
        ms = lambda values, q: percentile(values, q) * 1000  # noqa: E731
        refused = ", ".join(f"{status}: {n}" for status, n in sorted(self.refused.items())) or "0"
        table = Table(["measure", "value"])
        table.add("requests sent", self.sent)
        table.add("completed", self.completed)
        table.add("disconnected on purpose", self.disconnected)
        table.add("refused (with Retry-After)", f"{sum(self.refused.values())} ({refused})")
        table.add("failed", self.failed)
        table.add("bursts", f"{self.bursts} x {self.burst_size} requests")
        table.add("characters received", self.chars)
        table.add("characters/s (aggregate)", self.chars / self.wall_s if self.wall_s else math.nan)
        table.add("time to first char p50 / p99 (ms)",
                  f"{ms(self.ttfc_s, 0.5):.1f} / {ms(self.ttfc_s, 0.99):.1f}")
        table.add("inter-char latency p50 / p99 (ms)",
                  f"{ms(self.inter_char_s, 0.5):.2f} / {ms(self.inter_char_s, 0.99):.2f}")
        table.add("server RSS, all its processes: ready / after warm-up / after (MiB)",
                  f"{self.rss_ready / MIB:.1f} / {self.rss_warm / MIB:.1f} / {self.rss_after / MIB:.1f}")
        table.add("RSS growth after warm-up (MiB)", f"{self.rss_growth / MIB:+.1f}")
        table.add("rows / queue held after the run", f"{self.rows_after:g} / {self.queue_after:g}")
        table.add("server-counted disconnects", f"{self.server_disconnects:g}")
        table.add("wall time (s)", self.wall_s)
        lines = [table.markdown()]
        if self.failures:
            lines.append("failures: " + "; ".join(f"{n} x {why}" for why, n in self.failures.most_common(5)))
        return "\n".join(lines)


# --- Requests --------------------------------------------------------------------------------------

class Planner:
    """Random requests: prompts cut from the play, random sampling settings, random routes."""

    def __init__(self, config: LoadConfig, model: str, max_new_cap: int) -> None:
        self.config = config
        self.model = model
        self.max_new = max(1, min(config.max_new_tokens, max_new_cap))
        self.text = corpus_text()

    def prompt(self, rng: random.Random) -> str:
        start = rng.randrange(len(self.text))
        return self.text[start:start + rng.randint(0, MAX_PROMPT_CHARS)]

    def sampling(self, rng: random.Random) -> dict[str, Any]:
        settings = {
            "temperature": 0.0 if rng.random() < 0.2 else round(rng.uniform(0.2, 1.5), 3),
            "top_k": rng.randint(1, 80) if rng.random() < 0.4 else None,
            "top_p": round(rng.uniform(0.1, 1.0), 3) if rng.random() < 0.4 else None,
            "repetition_penalty": round(rng.uniform(0.8, 1.5), 3) if rng.random() < 0.3 else None,
            "seed": rng.randrange(2**32),
            "stop": rng.choice(STOP_CHOICES),
        }
        return {k: v for k, v in settings.items() if v is not None}

    def shot(self, rng: random.Random) -> Shot:
        stream = rng.random() < self.config.stream_share
        max_new = rng.randint(1, self.max_new)
        sampling = self.sampling(rng)
        hang_up = rng.randint(1, max(1, max_new // 2)) \
            if stream and rng.random() < self.config.disconnect_share else None
        has_stop = bool(sampling["stop"])
        if rng.random() < 0.5:
            path, body = "/generate_stream" if stream else "/generate", {
                "inputs": self.prompt(rng), "parameters": {"max_new_tokens": max_new, **sampling}}
            if stream and rng.random() < 0.3:  # TGI's other way to ask for a stream
                path, body = "/generate", {**body, "stream": True}
            return Shot(path, body, stream, False, max_new, has_stop, hang_up)
        body = {"model": self.model, "prompt": self.prompt(rng), "max_tokens": max_new, "stream": stream,
                **sampling}
        return Shot("/v1/completions", body, stream, True, max_new, has_stop, hang_up)

    def burst_shot(self, rng: random.Random) -> Shot:
        max_new = rng.randint(1, 8)
        parameters = {"max_new_tokens": max_new, "seed": rng.randrange(100)}
        body = {"inputs": self.prompt(rng), "parameters": parameters}
        return Shot("/generate", body, False, False, max_new, False)


async def send(http: httpx.AsyncClient, shot: Shot, report: LoadReport) -> float | None:
    """Send one request and account for its answer. Returns the Retry-After of a refusal."""
    report.sent += 1
    started = time.perf_counter()
    try:
        async with http.stream("POST", shot.path, json=shot.body) as response:
            if response.status_code in (429, 503):
                await response.aread()
                retry_after = response.headers.get("retry-after", "")
                if not retry_after.isdigit():
                    report.fail(f"{response.status_code} without Retry-After")
                    return None
                report.refused[response.status_code] += 1
                return float(retry_after)
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                report.fail(f"{shot.path} {response.status_code}: {body[:100]}")
                return None
            if shot.stream:
                await read_stream(response, shot, report, started)
            else:
                check_json(json.loads(await response.aread()), shot, report)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError, IndexError) as error:
        elapsed = time.perf_counter() - started
        report.fail(f"{shot.path}: {type(error).__name__} after {elapsed:.2f} s: {error}")
    return None


def check_json(answer: dict[str, Any], shot: Shot, report: LoadReport) -> None:
    if shot.openai:
        choice = answer["choices"][0]
        text, reason_ok = choice["text"], choice["finish_reason"] in ("stop", "length")
    else:
        text, reason_ok = answer["generated_text"], True
    if not reason_ok or not consistent_length(text, shot):
        report.fail(f"{shot.path}: {len(text)} characters for max {shot.max_new}")
        return
    report.completed += 1
    report.chars += len(text)


def consistent_length(text: str, shot: Shot) -> bool:
    # Without a stop string every request runs to its length; with one it may end sooner.
    return len(text) == shot.max_new or (shot.has_stop and len(text) < shot.max_new)


async def read_stream(response: httpx.Response, shot: Shot, report: LoadReport, started: float) -> None:
    pieces: list[str] = []
    events, last_text_at, final_text, finished = 0, None, None, False
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators and `: ping` comments
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            report.fail(f"{shot.path}: error event {data[:120]}")
            return
        if shot.openai:
            choices = event["choices"]
            text = choices[0]["text"] if choices else ""
            finished = finished or bool(choices and choices[0]["finish_reason"])
        else:
            text = event["token"]["text"]
            if event["generated_text"] is not None:
                final_text, finished = event["generated_text"], True
        if text:
            now = time.perf_counter()
            if last_text_at is None:
                report.ttfc_s.append(now - started)
            else:
                report.inter_char_s.append(now - last_text_at)
            last_text_at = now
            pieces.append(text)
        events += 1
        if shot.hang_up_after is not None and events >= shot.hang_up_after and not finished:
            report.disconnected += 1
            report.chars += sum(map(len, pieces))
            return  # leaving the `async with` closes the connection mid-stream
    text = "".join(pieces)
    if not finished or (final_text is not None and final_text != text) or not consistent_length(text, shot):
        report.fail(f"{shot.path}: stream ended badly ({len(text)} characters for max {shot.max_new}, "
                    f"finished={finished})")
        return
    report.completed += 1
    report.chars += len(text)


# --- The run -----------------------------------------------------------------------------------------

class Budget:
    """The bound on requests and time, shared by every task."""

    def __init__(self, config: LoadConfig) -> None:
        self.deadline = time.monotonic() + config.duration_s
        self.left = config.max_requests

    def take(self, n: int = 1) -> bool:
        if time.monotonic() >= self.deadline or self.left < n:
            return False
        self.left -= n
        return True


async def client(http: httpx.AsyncClient, planner: Planner, report: LoadReport, budget: Budget,
                 seed: int) -> None:
    rng = random.Random(seed)
    while budget.take():
        retry_after = await send(http, planner.shot(rng), report)
        if retry_after is not None:
            await asyncio.sleep(min(retry_after, max(0.0, budget.deadline - time.monotonic())))


async def bursts(http: httpx.AsyncClient, planner: Planner, report: LoadReport, budget: Budget,
                 every_s: float, size: int, seed: int) -> None:
    rng = random.Random(seed)
    in_flight: list[asyncio.Task] = []
    await asyncio.sleep(every_s / 2)
    while budget.take(size):
        report.bursts += 1
        # All at once, and on schedule: the next burst does not wait for this one's queued requests.
        in_flight += [asyncio.ensure_future(send(http, planner.burst_shot(rng), report)) for _ in range(size)]
        await asyncio.sleep(every_s)
    await asyncio.gather(*in_flight)


def resident_memory(server: psutil.Process) -> int:
    """Resident bytes of the server and its child processes (the engine runs in one)."""
    total = 0
    for process in [server, *server.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total


async def drive(base_url: str, server_pid: int, config: LoadConfig) -> LoadReport:
    """Run the load against the server at `base_url` (process `server_pid`, for its memory)."""
    server = psutil.Process(server_pid)
    report = LoadReport()
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as plain:
        info = (await plain.get("/info")).raise_for_status().json()
        limits = info["limits"]
        report.burst_size = limits["max_batch_size"] + limits["max_queue"] + config.burst_extra
        disconnects_before = server_metric(await plain.get("/metrics"), "caesar_disconnects_total")
    planner = Planner(config, info["model_id"], limits["max_new_tokens"])
    budget = Budget(config)
    report.rss_ready = resident_memory(server)

    async def sample_warm_rss() -> None:
        await asyncio.sleep(config.duration_s * config.warmup_share)
        report.rss_warm = resident_memory(server)

    connections = config.clients + report.burst_size + 8
    # Idle connections expire well before uvicorn's 5 s keep-alive timeout, so that no request is
    # sent down a connection the server is closing at that moment (a client-side race, not a failure).
    limits_ = httpx.Limits(max_connections=connections, max_keepalive_connections=connections,
                           keepalive_expiry=KEEPALIVE_EXPIRY_S)
    timeout = httpx.Timeout(config.request_timeout_s, connect=10, pool=config.request_timeout_s)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, limits=limits_, timeout=timeout) as http:
        tasks = [client(http, planner, report, budget, config.seed * 100_003 + n)
                 for n in range(config.clients)]
        tasks.append(bursts(http, planner, report, budget, config.burst_every_s, report.burst_size,
                            config.seed - 1))
        warm = asyncio.ensure_future(sample_warm_rss())
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), config.duration_s + config.request_timeout_s)
        except TimeoutError:
            report.fail("the run did not end within duration + request timeout")
        await warm
    report.wall_s = time.perf_counter() - started

    # Rows of hung-up streams are freed within a few decode steps: wait for them, briefly.
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as plain:
        deadline = time.monotonic() + 10
        while True:
            metrics = await plain.get("/metrics")
            report.rows_after = server_metric(metrics, "caesar_running_rows")
            report.queue_after = server_metric(metrics, "caesar_queue_size")
            if (report.rows_after == 0 and report.queue_after == 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        report.server_disconnects = server_metric(metrics, "caesar_disconnects_total") - disconnects_before
    report.rss_after = resident_memory(server)
    return report


def server_metric(response: httpx.Response, name: str) -> float:
    """An unlabelled sample of the Prometheus text in `response`."""
    for line in response.text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def run_load(base_url: str, server_pid: int, config: LoadConfig) -> LoadReport:
    return asyncio.run(drive(base_url, server_pid, config))


@contextmanager
def serve(checkpoint: Path, threads: int, max_batch_size: int | None, max_queue: int | None) -> Iterator[Any]:
    # The suite's launcher: a free loopback port, /ready awaited, SIGTERM on the way out.
    from tests.server_utils import running_server

    args = ["--log-level", "warning"]
    if max_batch_size is not None:
        args += ["--max-batch-size", str(max_batch_size)]
    if max_queue is not None:
        args += ["--max-queue", str(max_queue)]
    env = {"OMP_NUM_THREADS": str(threads), "CAESAR_THREADS": str(threads)}
    with running_server(checkpoint, *args, env=env, ready_timeout_s=300) as server:
        yield server


def main(argv: list[str] | None = None) -> None:
    parser: argparse.ArgumentParser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, help="concurrent clients (default 64; --quick 16)")
    parser.add_argument("--duration", type=float, help="seconds of load (default 60; --quick 10)")
    parser.add_argument("--max-requests", type=int, default=LoadConfig.max_requests)
    parser.add_argument("--checkpoint", type=Path,
                        help="checkpoint to serve (default: the shipped one, else a random `small` one)")
    parser.add_argument("--max-batch-size", type=int, help="server rows (default: the server's; --quick 8)")
    parser.add_argument("--max-queue", type=int, help="server queue (default: the server's; --quick 8)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    config = LoadConfig(clients=args.clients or (16 if quick else 64),
                        duration_s=args.duration or (10.0 if quick else 60.0),
                        max_requests=args.max_requests, burst_every_s=4.0 if quick else 10.0, seed=args.seed)
    max_batch = args.max_batch_size or (8 if quick else None)
    max_queue = args.max_queue if args.max_queue is not None else (8 if quick else None)
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = SHIPPED_CHECKPOINT if (SHIPPED_CHECKPOINT / "config.json").is_file() else None
    if checkpoint is None:
        checkpoint = random_checkpoint("small")
        print(f"note: no shipped checkpoint at {SHIPPED_CHECKPOINT}; serving random weights ({checkpoint})")
    print(f"load: {config.clients} clients for {config.duration_s:g} s against {checkpoint} "
          f"(server threads {args.threads}, max_batch_size {max_batch or 'default'}, "
          f"max_queue {max_queue if max_queue is not None else 'default'})", flush=True)
    with serve(checkpoint, args.threads, max_batch, max_queue) as server:
        report = run_load(server.base_url, server.process.pid, config)
    table = report.table()
    print(table)
    print(machine_line())
    if not args.no_docs and not quick:
        body = f"`{command_line(argv)}`\n\n{machine_line()}\n\n{table}\n"
        print(f"wrote {write_section(args.docs, 'load', 'Load: concurrent clients, bursts, hang-ups', body)}")
    if report.failed or report.rows_after or report.queue_after:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
