"""The engine in a process of its own, as vLLM V1 runs its engine core: the HTTP server and the
scheduler no longer take turns holding one GIL.

A decode step of a small model is some 160 short torch calls, each of which lets go of the GIL and
takes it back; in one process the event loop's per-character work slips in at every one of them,
and both sides spend their time handing the GIL over. Here the child process owns the model and
runs `service.engine.Engine` as it is; the parent (`EngineProcess`, an `EngineLike`) keeps what
the HTTP layer asks of an engine synchronously: admission (429 when full), readiness, draining.

The parent also supervises the child. When it dies (SIGKILL, a segfault, a CUDA error, its scheduler
thread failing), the requests in flight end with `Failed("engine_restart")` (503 with Retry-After, or
an `error` event), new requests are refused with 503 while /ready says 503, and a new child is
started (load, warm-up) after 0.5 s, then 1 s, 2 s... A first warm-up that fails, or three failed
restarts in a row, leave `alive` False: the server then exits non-zero (service/__main__.py).

The pipe carries, down: ("submit", id, GenerationRequest), ("cancel", id), ("abort", Failed),
("stop",); up: ("loaded", model card) or ("error", (is a CheckpointError, message)) once,
("ready",) after the warm-up, ("events", [(id, packed events), ...], (queue size, running rows))
once per scheduler iteration that has news (`pack_events`: a plain chunk of text as a tuple; a
non-streamed request has news once, when it ends: `GenerationRequest.final_only`), and
("died", message) if the warm-up or the scheduler thread fails.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from gpt import CharTokenizer, CheckpointError, read_config
from service.engine import (
    ENDINGS,
    Admission,
    Deliveries,
    Engine,
    EngineUnavailable,
    Event,
    Failed,
    GenerationRequest,
    QueueFull,
    RequestHandle,
    TextChunk,
    drain_in_flight,
    to_event_loops,
)
from service.settings import Settings

logger = logging.getLogger("service.engine")

STOP_TIMEOUT_S = 10.0
RESTART_BACKOFF_S = 0.5  # before the first restart of a dead engine; doubled after each failed one
MAX_RESTART_FAILURES = 3  # failed restarts in a row after which the server gives up (and exits)
ALIVE_CHECK_S = 0.5  # how often the engine process looks at its scheduler thread when idle


class EngineProcessError(Exception):
    """The engine process died, hung or failed while starting (loading its checkpoint, warming up)."""


class _Stopped(Exception):
    """The server is shutting down: stop starting engine processes."""


class _RemoteHandle(RequestHandle):
    def __init__(self, request_id: int, engine: EngineProcess) -> None:
        super().__init__()
        self.request_id = request_id
        self.engine = engine

    def cancel(self) -> None:
        if not self.cancelled:
            super().cancel()
            self.engine._cancel(self.request_id)


class _Child:
    """One engine process and the parent's end of its pipe."""

    def __init__(self, settings: Settings) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds threads
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=run_engine, args=(settings, child_conn),
                                       name="caesar-engine", daemon=True)
        self.started_at = time.monotonic()
        self.process.start()
        child_conn.close()
        self.pipe_lock = threading.Lock()  # sends, and the close that shutdown and the supervisor race to
        self.ready = False

    def send(self, message: tuple) -> None:
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)  # not Connection.send's ForkingPickler (Outbox)
        try:
            with self.pipe_lock:
                self.conn.send_bytes(data)
        except (OSError, ValueError):  # the process is gone; its reader reports it
            pass

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(STOP_TIMEOUT_S)
        self.close()

    def close(self) -> None:
        """Close the parent's end of the pipe, once: a second close would close whatever file
        descriptor took its number meanwhile, or raise EBADF."""
        with self.pipe_lock:
            if not self.conn.closed:
                self.conn.close()

    def how_it_ended(self) -> str:
        """Why the process is gone, in words: its exit code or the signal that killed it."""
        self.process.join(STOP_TIMEOUT_S)
        code = self.process.exitcode
        if code is None:
            self.process.kill()
            self.process.join(STOP_TIMEOUT_S)
            return "its pipe closed while it still ran (killed)"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
            return f"killed by signal {-code}"
        return f"exit code {code}"


class EngineProcess(Admission):
    """An EngineLike whose scheduler and model live in a child process (see the module docstring),
    restarted when it dies (see `_supervise`)."""

    def __init__(self, settings: Settings) -> None:
        config = read_config(settings.checkpoint)  # a missing or broken config fails here, at once
        if settings.threads is None:  # every CPU: see "The engine's threads" in docs/benchmarks.md
            settings = settings.model_copy(update={"threads": usable_cpus()})
        self.settings = settings
        self.tokenizer = CharTokenizer(config["vocab"])
        self.max_in_flight = settings.max_batch_size + settings.max_queue
        self.start_timeout_s = settings.engine_load_timeout_s
        self._lock = threading.Lock()  # guards _handles, _child, _ready: event loop vs supervisor
        self._handles: dict[int, _RemoteHandle] = {}
        self._ids = itertools.count()
        self._supervisor: threading.Thread | None = None
        self._stop = threading.Event()
        self._dead = False
        self._stopping = False
        self.queue_size = 0
        self.running_rows = 0
        self.restarts = 0  # engine processes started again after one died, and ready
        self.restart_failures = 0  # restarts that failed (load, warm-up, timeout), in all
        self.last_start_s: float | None = None  # spawn to ready, of the engine process serving now
        self.failure: str | None = None  # why the engine is gone for good (the server then exits)
        self._child = _Child(settings)
        try:
            self._card = self._wait_for(self._child, "loaded", "load the checkpoint")
        except BaseException:
            self._child.kill()
            raise

    # -- State, readable from any thread --

    @property
    def alive(self) -> bool:
        """False once the engine is gone for good: its first warm-up failed, or it failed to restart
        MAX_RESTART_FAILURES times in a row (or the supervisor thread itself died)."""
        supervising = self._supervisor is None or self._supervisor.is_alive() or self._stopping
        return not self._dead and supervising

    def model_card(self) -> dict[str, Any]:
        return dict(self._card)

    # -- Lifecycle --

    def start(self) -> None:
        if self._supervisor is None:
            self._supervisor = threading.Thread(target=self._supervise, name="caesar-engine-supervisor",
                                                daemon=True)
            self._supervisor.start()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        with self._lock:  # the supervisor marks the engine unready and sweeps the handles under it
            self.check_accepting()
            if len(self._handles) >= self.max_in_flight:
                raise QueueFull()
            handle = _RemoteHandle(next(self._ids), self)
            self._handles[handle.request_id] = handle
            child = self._child
        child.send(("submit", handle.request_id, request))
        return handle

    async def drain(self, timeout_s: float) -> None:
        self._draining = True
        await drain_in_flight(lambda: len(self._handles), self._abort, lambda: self.alive, timeout_s)

    def _abort(self, failure: Failed) -> None:
        self._child.send(("abort", failure))

    def shutdown(self) -> None:
        self._stopping = True
        self._stop.set()
        with self._lock:
            child = self._child
        if child.ready:
            child.send(("stop",))
            child.process.join(STOP_TIMEOUT_S)
            if child.process.is_alive():
                logger.warning("the engine process did not stop in %.0f s; killing it", STOP_TIMEOUT_S)
        child.kill()  # one that is still loading or warming up has nothing to finish
        if self._supervisor is not None:
            self._supervisor.join(STOP_TIMEOUT_S)

    # -- The supervisor thread --

    def _supervise(self) -> None:
        """Serve the engine process's messages; when it dies, fail the requests in flight with
        `engine_restart` and start another (load, warm-up), with backoff. The first warm-up failing,
        or MAX_RESTART_FAILURES failed restarts in a row, is final: `alive` turns False, and the
        server exits (service/__main__.py) so that compose or Kubernetes restart it."""
        child = self._child
        try:
            self._wait_for(child, "ready", "warm up")
        except _Stopped:
            return
        except Exception as error:  # noqa: BLE001 - every way to fail the first start is final
            if not self._stop.is_set():
                self._give_up(f"the engine could not start: {error}")
            return
        self._serving(child)
        while True:
            cause = self._read(child)
            if self._stopping:
                self._fail_in_flight(Failed("shutdown", "the server shut down before this request finished"))
                return
            failed = self._fail_in_flight(Failed(
                "engine_restart", "the generation engine stopped and is restarting; retry shortly"))
            if self._draining:
                logger.error("the engine process died (%s) while draining; %d requests in flight failed",
                             cause, failed)
                self._give_up(f"the engine process died while draining ({cause})")
                return
            logger.error("the engine process died (%s); %d requests in flight failed; restarting it",
                         cause, failed)
            next_child = self._restart()
            if next_child is None:
                return
            child = next_child

    def _restart(self) -> _Child | None:
        """Start engine processes until one is ready (returned), the server stops, or
        MAX_RESTART_FAILURES fail in a row (None both times)."""
        failures = 0
        while True:
            delay = RESTART_BACKOFF_S * 2 ** failures
            if self._stop.wait(delay):
                return None
            child = None
            try:
                child = self._spawn()
                card = self._wait_for(child, "loaded", "load the checkpoint")
                self._check_same_model(card)
                self._wait_for(child, "ready", "warm up")
            except _Stopped:
                if child is not None:
                    child.kill()
                return None
            except Exception as error:  # noqa: BLE001 - a failed restart, whatever its cause
                if child is not None:
                    child.kill()
                if self._stop.is_set():  # shutdown() killed it
                    return None
                failures += 1
                self.restart_failures += 1
                if failures >= MAX_RESTART_FAILURES:
                    self._give_up(f"the engine process failed to restart {failures} times in a row "
                                  f"(last: {error})")
                    return None
                logger.error("engine restart %d of %d failed: %s; next try in %.1f s", failures,
                             MAX_RESTART_FAILURES, error, RESTART_BACKOFF_S * 2 ** failures)
                continue
            self._card = card
            self.restarts += 1
            self._serving(child)
            logger.warning("the engine process restarted: ready in %.1f s (restart %d, pid %s)",
                           self.last_start_s, self.restarts, child.process.pid)
            return child

    def _spawn(self) -> _Child:
        with self._lock:  # shutdown() stops whichever child it finds here, so none escapes it
            if self._stop.is_set():
                raise _Stopped()
            self._child = _Child(self.settings)
            return self._child

    def _wait_for(self, child: _Child, expected: str, doing: str) -> Any:
        """Wait up to `engine_load_timeout_s` for the child's `expected` message ("loaded": returns the
        model card; "ready"). Raises CheckpointError or RuntimeError as the child reported them,
        EngineProcessError for a crash, a failed warm-up or a timeout, _Stopped on shutdown."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._stop.is_set():
                raise _Stopped()
            left = deadline - time.monotonic()
            if left <= 0:
                child.kill()
                raise EngineProcessError(f"the engine process did not {doing} within "
                                         f"{self.start_timeout_s:g} s (engine_load_timeout_s)")
            try:
                if not child.conn.poll(min(left, 0.25)):
                    continue
                message = child.conn.recv()
            except (EOFError, OSError):
                raise EngineProcessError(f"the engine process ended ({child.how_it_ended()}) before it could "
                                         f"{doing}") from None
            kind = message[0]
            if kind == expected:
                return message[1] if len(message) > 1 else None
            if kind == "error":  # the child's CheckpointError, or its RuntimeError or ValueError, raised here
                child.process.join(STOP_TIMEOUT_S)
                checkpoint_problem, text = message[1]
                raise CheckpointError(text) if checkpoint_problem else RuntimeError(text)
            if kind == "died":
                child.process.join(STOP_TIMEOUT_S)
                raise EngineProcessError(f"the engine process {message[1]}")
            if kind == "events":  # not before "ready"; handled all the same
                self._dispatch(message[1])

    def _check_same_model(self, card: dict[str, Any]) -> None:
        """A restarted engine must serve the model the server started with: the HTTP side keeps its
        tokenizer and limits. A checkpoint replaced on disk fails the restart (restart the server)."""
        for key in ("vocab", "context", "weights_sha256"):
            if card.get(key) != self._card.get(key):
                raise EngineProcessError(f"the checkpoint changed since the server started ({key} differs); "
                                         "restart the server to serve it")

    def _serving(self, child: _Child) -> None:
        child.ready = True
        self.last_start_s = time.monotonic() - child.started_at
        with self._lock:
            self._ready = True
            self._restarting = False

    def _read(self, child: _Child) -> str:
        """Hand each message's events to their requests' event loops until the child is gone; say why."""
        cause = None
        while True:
            try:
                message = child.conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "events":
                _, items, (self.queue_size, self.running_rows) = message
                self._dispatch(items)
            elif kind == "died":
                cause = message[1]
                break
        ended = child.how_it_ended()
        child.close()
        return f"{cause}; {ended}" if cause else ended

    def _fail_in_flight(self, failure: Failed) -> int:
        """Mark the engine unready and end every request in flight with `failure`; how many there were."""
        with self._lock:
            self._ready = False
            self._restarting = True
            orphans = [(handle, [failure]) for handle in self._handles.values()]
            self._handles.clear()
        self.queue_size = self.running_rows = 0
        to_event_loops(orphans)
        return len(orphans)

    def _give_up(self, reason: str) -> None:
        self.failure = reason
        self._fail_in_flight(Failed("engine_restart", "the generation engine stopped; retry shortly"))
        self._dead = True
        logger.critical("%s; the server exits so that its supervisor (compose, Kubernetes) restarts it",
                        reason)

    # -- Requests --

    def _cancel(self, request_id: int) -> None:
        """The client left: forget the request (its place counts no more) and free its row."""
        with self._lock:
            self._handles.pop(request_id, None)
            child = self._child
        child.send(("cancel", request_id))

    def _dispatch(self, items: list[tuple[int, list]]) -> None:
        deliveries = []
        with self._lock:
            for request_id, packed in items:
                handle = self._handles.get(request_id)
                if handle is None:  # cancelled: nobody listens
                    continue
                events = unpack_events(packed)
                if isinstance(events[-1], ENDINGS):
                    del self._handles[request_id]
                deliveries.append((handle, events))
        to_event_loops(deliveries)


def pack_events(events: list[Event]) -> tuple[str, float] | list[Event | tuple[str, float]]:
    """A request's events for the pipe. A chunk of plain text (nearly every event) goes as a tuple
    (text, time): pickling a dataclass costs five times as much, once per row per step in the engine
    process, and a step's rows share one time object, which pickle writes once. A delivery of that
    one chunk alone (nearly every delivery) is the tuple itself, not a list of it."""
    if len(events) == 1 and type(event := events[0]) is TextChunk and event.token is None:
        return (event.text, event.time)
    return [(event.text, event.time) if type(event) is TextChunk and event.token is None else event
            for event in events]


def unpack_events(packed: tuple[str, float] | list[Event | tuple[str, float]]) -> list[Event]:
    if type(packed) is tuple:
        return [TextChunk(*packed)]
    return [TextChunk(*event) if type(event) is tuple else event for event in packed]


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>", or "max <period>"


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity, where the OS has one, within a container's CPU
    quota (`docker run --cpus 2`), rounded up. More torch threads than the quota would stall each
    parallel region on a throttled thread."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 file here, or not in the format above
        pass
    return cpus


class ForwardedHandle:
    """A request's handle in the engine process: its id, and whether its client left."""

    __slots__ = ("request_id", "cancelled")

    def __init__(self, request_id: int) -> None:
        self.request_id = request_id
        self.cancelled = False


OUTBOX_CLOSE_TIMEOUT_S = 10.0


class Outbox:
    """The engine process's messages to the parent, written in order by a thread of their own. An
    iteration's events are packed (`pack_events`), pickled and written while the scheduler thread
    runs the next model step, whose products leave the GIL free, instead of before it: at 64 rows
    that is some 2 us a row off every step. pickle.dumps, not Connection.send's ForkingPickler (a
    new pickler and dispatch table per message, for file descriptors these messages never hold);
    the parent's recv() reads either."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.queue: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._write, name="engine-outbox", daemon=True)
        self.thread.start()

    def send(self, message: tuple) -> None:
        """Queue a message; ("events", [(id, [Event, ...]), ...], state) is packed on the way."""
        self.queue.put(message)

    def close(self) -> None:
        """Write what is queued, then stop (or give up after a while: a parent that stopped reading)."""
        self.queue.put(None)
        self.thread.join(timeout=OUTBOX_CLOSE_TIMEOUT_S)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def _write(self) -> None:
        while (message := self.queue.get()) is not None:
            try:
                if message[0] == "events":
                    _, items, state = message
                    message = ("events", [(request_id, pack_events(events)) for request_id, events in items],
                               state)
                self.conn.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))
            except OSError:  # the parent is gone: the main thread sees it too, and stops
                return
            except Exception:  # nothing more reaches the parent: the process ends, and is restarted
                logger.exception("the engine process could not send a message")
                return


def run_engine(settings: Settings, conn: Connection) -> None:
    """The engine process: load, warm up, then serve the pipe until told to stop or the parent goes."""
    # The parent decides when to stop (its first signal drains); a Ctrl-C reaches the whole group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from service.__main__ import configure_logging
    configure_logging(settings.log_level)
    handles: dict[int, ForwardedHandle] = {}
    last_state: tuple[int, int] | None = None
    outbox = Outbox(conn)  # this thread's messages and the scheduler thread's, in order
    send = outbox.send

    def forward(deliveries: Deliveries) -> None:
        nonlocal last_state
        state = (engine.queue_size, engine.running_rows)
        if not deliveries and state == last_state:
            return
        last_state = state
        items = []
        for handle, events in deliveries:
            items.append((handle.request_id, events))
            if isinstance(events[-1], ENDINGS):
                handles.pop(handle.request_id, None)
        send(("events", items, state))

    try:
        try:
            # The parent admits (429 when full). A cancelled request leaves its count at once but holds
            # its row here for up to two more steps, so this engine's own bound sits a batch above it.
            engine = Engine.from_settings(settings, on_events=forward,
                                          max_queue=settings.max_queue + settings.max_batch_size)
        except (CheckpointError, RuntimeError, ValueError) as error:
            send(("error", (isinstance(error, CheckpointError), str(error))))
            return
        send(("loaded", engine.model_card()))
        engine.start()
        while not engine.ready:
            if not engine.alive:
                send(("died", f"failed its warm-up: {describe(engine._thread_error)}"))
                return
            time.sleep(0.05)
        send(("ready",))
        while engine.alive and outbox.alive:
            try:
                if not conn.poll(ALIVE_CHECK_S):
                    continue
                message = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                break
            kind = message[0]
            if kind == "submit":
                _, request_id, request = message
                handle = handles[request_id] = ForwardedHandle(request_id)
                try:
                    engine.submit(request, handle)
                except (EngineUnavailable, QueueFull) as error:
                    forward([(handle, [Failed("generation", f"the engine refused the request: {error}")])])
            elif kind == "cancel":
                handle = handles.pop(message[1], None)
                if handle is not None:
                    handle.cancelled = True
            elif kind == "abort":
                engine.abort(message[1])
            elif kind == "stop":
                break
        if not engine.alive:
            send(("died", f"lost its scheduler thread: {describe(engine._thread_error)}"))
        engine.shutdown()
    finally:
        outbox.close()  # what is queued reaches the parent before this process ends


def describe(error: BaseException | None) -> str:
    """An exception in one short line: its type and the first line of its message."""
    if error is None:
        return "no exception recorded"
    message = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
