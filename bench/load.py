"""Load test: many concurrent clients against a real `python -m service` on loopback, bounded in
requests and in time.

    .venv/bin/python -m bench.load --quick                   # 16 clients, 10 s, 8 rows + 8 queued
    .venv/bin/python -m bench.load --clients 64 --duration 60  # the record: default server limits
    .venv/bin/python -m bench.load --quick --chaos           # and SIGKILL the engine process once

Each client loops: it picks a route (native JSON, native SSE, OpenAI JSON, OpenAI SSE), random
sampling settings and a random prompt from the play, sends, and checks the answer: the length asked
for unless a stop string was given, and a stream's characters must concatenate to its final text. A
share of the streams is hung up on mid-stream. Every `burst_every_s` a burst of
`max_batch_size + max_queue + burst_extra` short requests arrives at once on top of the clients, so
some must be refused. Clients honour Retry-After, as well-behaved ones do; bursts do not retry.

A share of the clients (`--hostile-share`) is hostile: valid but extreme settings (top_p near or
below float32's smallest normal number, repetition_penalty 100 or 0.01, temperature 0.001 or 100, a
huge top_k, max_new_tokens 0, prompts longer than the context). They are counted apart: a hostile
request may be refused with a 4xx, never answered with a 5xx, and must not make a good one fail.

`--chaos` SIGKILLs the engine process (the server's child) once, `chaos_at` of the way into the run,
and measures the seconds until the service is ready again (/ready 200 and a restart counted in
/metrics), against the engine's start time at launch (`caesar_engine_start_seconds`); the run then
goes on for at least `after_ready_share` of its duration, and at least as long as the Retry-After the
service gave the clients it refused meanwhile, so that they come back. Requests in flight at the kill that end
with a 503 or an `unavailable` error event are counted as failed by the kill; everything else is
held to the rules below.

  completed     a 200 whose body is whole and consistent
  disconnected  streams this script hung up on, on purpose (the server must free their rows)
  refused       429 or 503 carrying Retry-After: the only refusals allowed
  rejected      (hostile requests only) a 4xx in the documented shape: a setting refused at the edge
  failed        anything else: another status, a refusal without Retry-After, an error event, a
                broken or inconsistent body, a transport error, a timeout. Must be 0, for the good
                requests and the hostile ones alike.

Printed: those counts; time to first character (good streams, client side) and inter-character
latency (between consecutive streamed events) p50/p99; the server's resident memory (its processes
together) when ready, after the warm-up part of the run and after the run; the rows and queue entries
it still holds after the run (from /metrics; must be 0); with --chaos, the kill's figures.
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import (
    Table,
    base_parser,
    command_line,
    corpus_text,
    machine_line,
    percentile,
    resolve_checkpoint,
    write_section,
)
from service.errors import RETRY_AFTER_UNAVAILABLE_S

MIB = 1 << 20
KEEPALIVE_EXPIRY_S = 2.0
MAX_PROMPT_CHARS = 200
STOP_CHOICES: list[list[str]] = [[], [], [], ["\n\n"], ["the", "CAESAR"], ["."]]
# Valid, extreme sampling settings: each is honoured, or refused at the edge with a 4xx naming it.
HOSTILE_SETTINGS: list[dict[str, Any]] = [
    {"top_p": 1e-38}, {"top_p": 1.2e-38}, {"top_p": 1e-30, "temperature": 100.0},
    {"repetition_penalty": 100.0}, {"repetition_penalty": 0.01}, {"temperature": 0.001},
    {"temperature": 100.0}, {"top_k": 10**12}, {"top_k": 2**63 - 1},
    {"temperature": 0.001, "repetition_penalty": 100.0}, {"temperature": 100.0, "top_p": 1.2e-38, "top_k": 1},
    {"repetition_penalty": 0.01, "temperature": 0.001, "top_k": 10**12},
]
READY_AGAIN_TIMEOUT_S = 300.0


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
    hostile_share: float = 0.2  # of the clients: they send valid but extreme settings
    chaos: bool = False  # SIGKILL the engine process once, this far into the run:
    chaos_at: float = 0.3
    after_ready_share: float = 0.3  # and run on for at least this much of duration_s once ready again


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
    hostile: bool = False


@dataclass
class Tally:
    """What became of one kind of request (good or hostile)."""

    sent: int = 0
    completed: int = 0
    disconnected: int = 0
    refused: Counter[int] = field(default_factory=Counter)  # by status; all carried Retry-After
    rejected: Counter[int] = field(default_factory=Counter)  # 4xx in the documented shape (hostile only)
    killed: int = 0  # in flight at the engine's kill, and ended by it (--chaos)
    failed: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # why, for the message

    def fail(self, why: str) -> None:
        self.failed += 1
        self.failures[why[:160]] += 1


@dataclass(frozen=True)
class Outcome:
    """How one request ended, as `send` saw it."""

    kind: str  # completed, disconnected, refused, rejected, unavailable (a 503 or error event), failed
    status: int = 200
    why: str = ""
    chars: int = 0
    retry_after: float | None = None


@dataclass
class LoadReport:
    good: Tally = field(default_factory=Tally)  # bursts included; failed (outside the kill) must be 0
    hostile: Tally = field(default_factory=Tally)
    ttfc_s: list[float] = field(default_factory=list)
    inter_char_s: list[float] = field(default_factory=list)
    chars: int = 0
    wall_s: float = 0.0
    burst_size: int = 0
    bursts: int = 0
    hostile_clients: int = 0
    rss_ready: int = 0
    rss_warm: int = 0
    rss_after: int = 0
    rows_after: float = math.nan
    queue_after: float = math.nan
    server_disconnects: float = math.nan
    # --chaos:
    chaos: bool = False
    kill_at: float | None = None  # time.perf_counter() of the SIGKILL
    kill_at_run_s: float = math.nan  # seconds into the run
    killed_pid: int | None = None
    engine_start_s: float = math.nan  # the engine's start to ready at launch (spawn, load, warm-up)
    restart_start_s: float = math.nan  # the same for the restarted engine
    ready_again_s: float = math.nan  # from the kill to /ready 200 with the restart counted
    restarts: float = math.nan  # caesar_engine_restarts_total after the run
    completed_after_ready: int = 0  # good requests sent after the service was ready again, completed
    ready_again_at: float | None = None

    def fail(self, why: str) -> None:
        self.good.fail(why)

    @property
    def failed(self) -> int:
        """Good requests failed outside the kill: must be 0."""
        return self.good.failed

    def account(self, shot: Shot, outcome: Outcome, started: float, ended: float) -> None:
        """Count one request's outcome, for its kind; a failure of a request in flight at the kill
        that the kill explains (a 503, an `unavailable` error event) counts as killed."""
        in_flight_at_kill = self.kill_at is not None and started <= self.kill_at <= ended
        tally = self.hostile if shot.hostile else self.good
        tally.sent += 1
        self.chars += outcome.chars
        if outcome.kind in ("completed", "disconnected"):
            setattr(tally, outcome.kind, getattr(tally, outcome.kind) + 1)
            if outcome.kind == "completed" and not shot.hostile and self.ready_again_at is not None \
                    and started >= self.ready_again_at:
                self.completed_after_ready += 1
        elif outcome.kind == "unavailable" and in_flight_at_kill:
            tally.killed += 1
        elif outcome.kind in ("refused", "unavailable") and outcome.retry_after is not None:
            tally.refused[outcome.status] += 1
        elif outcome.kind == "rejected" and shot.hostile:
            tally.rejected[outcome.status] += 1
        else:
            tally.fail(outcome.why or f"{shot.path} {outcome.status}")

    @property
    def rss_growth(self) -> int:
        """Resident memory gained between the end of the warm-up and the end of the run."""
        return self.rss_after - self.rss_warm

    @property
    def ready_within_bound(self) -> bool:
        """Ready again within the engine's start time at launch plus 5 s (issue 15's bound)."""
        return self.ready_again_s <= self.engine_start_s + 5.0

    def table(self) -> str:
        ms = lambda values, q: percentile(values, q) * 1000  # noqa: E731
        counts = lambda c: ", ".join(f"{status}: {n}" for status, n in sorted(c.items())) or "0"  # noqa: E731
        good, hostile = self.good, self.hostile
        table = Table(["measure", "value"])
        table.add("requests sent (good / hostile)", f"{good.sent} / {hostile.sent}")
        table.add("completed (good / hostile)", f"{good.completed} / {hostile.completed}")
        table.add("disconnected on purpose", good.disconnected)
        table.add("refused with Retry-After (good)", f"{sum(good.refused.values())} ({counts(good.refused)})")
        table.add("refused with Retry-After (hostile)",
                  f"{sum(hostile.refused.values())} ({counts(hostile.refused)})")
        table.add("hostile settings refused with a 4xx", f"{sum(hostile.rejected.values())} "
                  f"({counts(hostile.rejected)})")
        table.add("good requests failed" + (" outside the kill" if self.chaos else ""), good.failed)
        table.add("hostile requests failed (5xx, error events, broken answers)", hostile.failed)
        table.add("hostile clients", f"{self.hostile_clients} of the clients")
        table.add("bursts", f"{self.bursts} x {self.burst_size} requests")
        if self.chaos:
            table.add("engine process SIGKILLed at (s into the run)", f"{self.kill_at_run_s:.1f}")
            table.add("requests failed by the kill, in flight (good / hostile)",
                      f"{good.killed} / {hostile.killed}")
            table.add("ready again after the kill (s)", f"{self.ready_again_s:.2f}")
            table.add("engine start at launch / restarted (s)",
                      f"{self.engine_start_s:.2f} / {self.restart_start_s:.2f}")
            table.add("ready again within start + 5 s", "yes" if self.ready_within_bound else "NO")
            table.add("engine restarts (caesar_engine_restarts_total)", f"{self.restarts:g}")
            table.add("good requests completed after ready again", self.completed_after_ready)
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
        for name, failures in (("good", good.failures), ("hostile", hostile.failures)):
            if failures:
                worst = "; ".join(f"{n} x {why}" for why, n in failures.most_common(5))
                lines.append(f"{name} failures: {worst}")
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        """What the run must show: nothing failed, every row given back, and with --chaos, one restart
        and the service ready again."""
        chaos_ok = not self.chaos or (self.restarts == 1 and not math.isnan(self.ready_again_s))
        return not self.failed and not self.hostile.failed and not self.rows_after and not self.queue_after \
            and chaos_ok


# --- Requests --------------------------------------------------------------------------------------

class Planner:
    """Random requests: prompts cut from the play, random sampling settings, random routes."""

    def __init__(self, config: LoadConfig, model: str, max_new_cap: int, context: int = 128) -> None:
        self.config = config
        self.model = model
        self.max_new = max(1, min(config.max_new_tokens, max_new_cap))
        self.context = context
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
        return self._shot(rng, self.sampling(rng), rng.randint(1, self.max_new), self.prompt(rng),
                          self.config.disconnect_share)

    def hostile_shot(self, rng: random.Random) -> Shot:
        """Valid but extreme: sampling settings at the edges, sometimes max_new_tokens 0, sometimes a
        prompt longer than the context. Never hung up on."""
        sampling = {**rng.choice(HOSTILE_SETTINGS), "seed": rng.randrange(2**32), "stop": []}
        max_new = 0 if rng.random() < 0.15 else rng.randint(1, self.max_new)
        prompt = self.prompt(rng)
        if rng.random() < 0.3:
            start = rng.randrange(len(self.text) - 8 * self.context)
            prompt = self.text[start:start + rng.randint(self.context + 1, 8 * self.context)]
        return replace(self._shot(rng, sampling, max_new, prompt, 0.0), hostile=True)

    def _shot(self, rng: random.Random, sampling: dict[str, Any], max_new: int, prompt: str,
              disconnect_share: float) -> Shot:
        stream = rng.random() < self.config.stream_share
        hang_up = rng.randint(1, max(1, max_new // 2)) if stream and rng.random() < disconnect_share else None
        has_stop = bool(sampling["stop"])
        if rng.random() < 0.5:
            path, body = "/generate_stream" if stream else "/generate", {
                "inputs": prompt, "parameters": {"max_new_tokens": max_new, **sampling}}
            if stream and rng.random() < 0.3:  # TGI's other way to ask for a stream
                path, body = "/generate", {**body, "stream": True}
            return Shot(path, body, stream, False, max_new, has_stop, hang_up)
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_new, "stream": stream, **sampling}
        return Shot("/v1/completions", body, stream, True, max_new, has_stop, hang_up)

    def burst_shot(self, rng: random.Random) -> Shot:
        max_new = rng.randint(1, 8)
        parameters = {"max_new_tokens": max_new, "seed": rng.randrange(100)}
        body = {"inputs": self.prompt(rng), "parameters": parameters}
        return Shot("/generate", body, False, False, max_new, False)


async def send(http: httpx.AsyncClient, shot: Shot, report: LoadReport) -> float | None:
    """Send one request and account for its answer. Returns the Retry-After of a refusal."""
    started = time.perf_counter()
    try:
        outcome = await exchange(http, shot, report, started)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError, IndexError) as error:
        elapsed = time.perf_counter() - started
        outcome = Outcome("failed", 0, f"{shot.path}: {type(error).__name__} after {elapsed:.2f} s: {error}")
    report.account(shot, outcome, started, time.perf_counter())
    return outcome.retry_after


async def exchange(http: httpx.AsyncClient, shot: Shot, report: LoadReport, started: float) -> Outcome:
    async with http.stream("POST", shot.path, json=shot.body) as response:
        status = response.status_code
        if status in (429, 503):
            await response.aread()
            retry_after = response.headers.get("retry-after", "")
            if not retry_after.isdigit():
                return Outcome("failed", status, f"{status} without Retry-After")
            kind = "refused" if status == 429 else "unavailable"
            return Outcome(kind, status, retry_after=float(retry_after))
        if status != 200:
            body = (await response.aread()).decode(errors="replace")
            if 400 <= status < 500 and documented_error(body, shot.openai):
                return Outcome("rejected", status, f"{shot.path} {status}: {body[:100]}")
            return Outcome("failed", status, f"{shot.path} {status}: {body[:100]}")
        if shot.stream:
            return await read_stream(response, shot, report, started)
        return check_json(json.loads(await response.aread()), shot)


def documented_error(body: str, openai: bool) -> bool:
    """A refusal in the route family's documented shape."""
    try:
        error = json.loads(body)
    except json.JSONDecodeError:
        return False
    if openai:
        inner = error.get("error")
        return isinstance(inner, dict) and {"message", "type", "param", "code"} <= set(inner)
    return {"error", "error_type"} <= set(error)


def check_json(answer: dict[str, Any], shot: Shot) -> Outcome:
    if shot.openai:
        choice = answer["choices"][0]
        text, reason_ok = choice["text"], choice["finish_reason"] in ("stop", "length")
    else:
        text, reason_ok = answer["generated_text"], True
    if not reason_ok or not consistent_length(text, shot):
        return Outcome("failed", why=f"{shot.path}: {len(text)} characters for max {shot.max_new}")
    return Outcome("completed", chars=len(text))


def consistent_length(text: str, shot: Shot) -> bool:
    # Without a stop string every request runs to its length; with one it may end sooner.
    return len(text) == shot.max_new or (shot.has_stop and len(text) < shot.max_new)


def unavailable_event(event: dict[str, Any]) -> bool:
    """An `error` event that says the engine went away (restarting, or shutting down)."""
    error = event["error"]
    if isinstance(error, dict):  # OpenAI's shape
        return error.get("code") in ("unavailable", "engine_restart", "shutdown")
    return event.get("error_type") == "unavailable"


async def read_stream(response: httpx.Response, shot: Shot, report: LoadReport, started: float) -> Outcome:
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
            kind = "unavailable" if unavailable_event(event) else "failed"
            return Outcome(kind, why=f"{shot.path}: error event {data[:120]}", chars=sum(map(len, pieces)))
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
            if not shot.hostile:
                if last_text_at is None:
                    report.ttfc_s.append(now - started)
                else:
                    report.inter_char_s.append(now - last_text_at)
            last_text_at = now
            pieces.append(text)
        events += 1
        if shot.hang_up_after is not None and events >= shot.hang_up_after and not finished:
            # Leaving the `async with` closes the connection mid-stream.
            return Outcome("disconnected", chars=sum(map(len, pieces)))
    text = "".join(pieces)
    if not finished or (final_text is not None and final_text != text) or not consistent_length(text, shot):
        return Outcome("failed", why=f"{shot.path}: stream ended badly ({len(text)} characters for max "
                       f"{shot.max_new}, finished={finished})", chars=len(text))
    return Outcome("completed", chars=len(text))


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
                 seed: int, hostile: bool = False) -> None:
    rng = random.Random(seed)
    while budget.take():
        shot = planner.hostile_shot(rng) if hostile else planner.shot(rng)
        retry_after = await send(http, shot, report)
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


def engine_process(server: psutil.Process) -> psutil.Process:
    """The server's child that runs the engine (multiprocessing also starts a resource tracker)."""
    engines = []
    for child in server.children():
        with contextlib.suppress(psutil.Error):
            if "spawn_main" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                engines.append(child)
    if len(engines) != 1:
        raise RuntimeError(f"expected one engine process under the server (pid {server.pid}), found "
                           f"{len(engines)}: --chaos needs the default --engine-process")
    return engines[0]


async def chaos(base_url: str, server: psutil.Process, report: LoadReport, config: LoadConfig,
                budget: Budget, run_started: float) -> None:
    """SIGKILL the engine process `chaos_at` into the run; measure the time until the service is
    ready again with a restart counted; then let the run go on for at least `after_ready_share` of
    its duration, and for longer than the clients refused during the restart were told to wait, so
    that requests after the restart count too (a restart slower than that wait would otherwise leave
    every client asleep until the run's end)."""
    await asyncio.sleep(config.duration_s * config.chaos_at)
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as plain:
        metrics = await plain.get("/metrics")
        report.engine_start_s = server_metric(metrics, "caesar_engine_start_seconds")
        restarts_before = server_metric(metrics, "caesar_engine_restarts_total")
        engine = engine_process(server)
        report.killed_pid = engine.pid
        deadline, budget.deadline = budget.deadline, math.inf  # no client gives up while it restarts
        report.kill_at = time.perf_counter()
        engine.kill()
        report.kill_at_run_s = report.kill_at - run_started
        while time.perf_counter() < report.kill_at + READY_AGAIN_TIMEOUT_S:
            with contextlib.suppress(httpx.HTTPError):
                if (await plain.get("/ready")).status_code == 200:
                    metrics = await plain.get("/metrics")
                    if server_metric(metrics, "caesar_engine_restarts_total") > restarts_before:
                        now = time.perf_counter()
                        report.ready_again_at, report.ready_again_s = now, now - report.kill_at
                        report.restart_start_s = server_metric(metrics, "caesar_engine_start_seconds")
                        after_ready_s = max(config.duration_s * config.after_ready_share,
                                            RETRY_AFTER_UNAVAILABLE_S + 1.0)
                        budget.deadline = max(deadline, time.monotonic() + after_ready_s)
                        return
            await asyncio.sleep(0.05)
    budget.deadline = deadline
    report.fail(f"the service was not ready again within {READY_AGAIN_TIMEOUT_S:g} s of the kill")


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
    planner = Planner(config, info["model_id"], limits["max_new_tokens"], limits["context"])
    budget = Budget(config)
    report.rss_ready = resident_memory(server)
    report.chaos = config.chaos
    report.hostile_clients = round(config.clients * config.hostile_share)

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
        # Hostile clients are spread among the good ones (every few clients, not the last ones).
        share = report.hostile_clients
        hostile = {round(k * config.clients / share) for k in range(share)} if share else set()
        tasks = [client(http, planner, report, budget, config.seed * 100_003 + n, hostile=n in hostile)
                 for n in range(config.clients)]
        tasks.append(bursts(http, planner, report, budget, config.burst_every_s, report.burst_size,
                            config.seed - 1))
        if config.chaos:
            tasks.append(chaos(base_url, server, report, config, budget, started))
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
        report.restarts = server_metric(metrics, "caesar_engine_restarts_total")
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


def main(argv: list[str] | None = None) -> LoadReport:
    parser: argparse.ArgumentParser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, help="concurrent clients (default 64; --quick 16)")
    parser.add_argument("--duration", type=float, help="seconds of load (default 60; --quick 10)")
    parser.add_argument("--max-requests", type=int, default=LoadConfig.max_requests)
    parser.add_argument("--checkpoint", type=Path,
                        help="checkpoint to serve (default: the shipped one, else a random `small` one)")
    parser.add_argument("--max-batch-size", type=int, help="server rows (default: the server's; --quick 8)")
    parser.add_argument("--max-queue", type=int, help="server queue (default: the server's; --quick 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hostile-share", type=float, default=LoadConfig.hostile_share,
                        help="share of the clients sending valid but extreme settings (default %(default)s)")
    parser.add_argument("--chaos", action="store_true",
                        help=f"SIGKILL the engine process once, {LoadConfig.chaos_at:.0%} into the run")
    args = parser.parse_args(argv)
    quick = args.quick
    if not 0 <= args.hostile_share <= 1:
        parser.error("--hostile-share must be between 0 and 1")
    config = LoadConfig(clients=args.clients or (16 if quick else 64),
                        duration_s=args.duration or (10.0 if quick else 60.0),
                        max_requests=args.max_requests, burst_every_s=4.0 if quick else 10.0, seed=args.seed,
                        hostile_share=args.hostile_share, chaos=args.chaos)
    max_batch = args.max_batch_size or (8 if quick else None)
    max_queue = args.max_queue if args.max_queue is not None else (8 if quick else None)
    checkpoint, which = resolve_checkpoint(args.checkpoint)
    print(f"serving {which}")
    print(f"load: {config.clients} clients ({config.hostile_share:.0%} hostile) for {config.duration_s:g} s "
          f"against {checkpoint} (server threads {args.threads}, max_batch_size {max_batch or 'default'}, "
          f"max_queue {max_queue if max_queue is not None else 'default'})"
          + (f"; the engine process is SIGKILLed {config.chaos_at:.0%} into the run" if config.chaos else ""),
          flush=True)
    with serve(checkpoint, args.threads, max_batch, max_queue) as server:
        report = run_load(server.base_url, server.process.pid, config)
    table = report.table()
    print(table)
    print(machine_line())
    if not args.no_docs and not quick:
        body = f"`{command_line(argv)}`\n\n{machine_line()}\n\n{table}\n"
        key, title = ("load-chaos", "Load with the engine process killed once (--chaos)") if config.chaos \
            else ("load", "Load: concurrent clients, hostile settings, bursts, hang-ups")
        print(f"wrote {write_section(args.docs, key, title, body)}")
    if not report.ok:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
