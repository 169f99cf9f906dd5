"""The engine in a process of its own, as vLLM V1 runs its engine core: the HTTP server and the
scheduler no longer take turns holding one GIL.

A decode step of a small model is some 160 short torch calls, each of which lets go of the GIL and
takes it back; in one process the event loop's per-character work slips in at every one of them,
and both sides spend their time handing the GIL over. Here the child process owns the model and
runs `service.engine.Engine` as it is; the parent (`EngineProcess`, an `EngineLike`) keeps what
the HTTP layer asks of an engine synchronously: admission (429 when full), readiness, draining.

The pipe carries, down: ("submit", id, GenerationRequest), ("cancel", id), ("abort", Failed),
("stop",); up: ("loaded", model card) or ("error", (is a CheckpointError, message)) once,
("ready",) after the warm-up, ("events", [(id, [Event, ...]), ...], (queue size, running rows))
once per scheduler iteration that has news, and ("died", message) if the scheduler thread fails.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from gpt import CharTokenizer, CheckpointError, read_config
from service.engine import (
    Admission,
    Deliveries,
    Engine,
    EngineUnavailable,
    Failed,
    Finished,
    GenerationRequest,
    QueueFull,
    RequestHandle,
    drain_in_flight,
    to_event_loops,
)
from service.settings import Settings

logger = logging.getLogger("service.engine")

LOAD_TIMEOUT_S = 600.0  # loading a checkpoint (not the warm-up, which /ready reports)
STOP_TIMEOUT_S = 10.0
ALIVE_CHECK_S = 0.5  # how often the engine process looks at its scheduler thread when idle


class EngineProcessError(Exception):
    """The engine process died or hung while loading its checkpoint."""


class _RemoteHandle(RequestHandle):
    def __init__(self, request_id: int, engine: EngineProcess) -> None:
        super().__init__()
        self.request_id = request_id
        self.engine = engine

    def cancel(self) -> None:
        if not self.cancelled:
            super().cancel()
            self.engine._cancel(self.request_id)


class EngineProcess(Admission):
    """An EngineLike whose scheduler and model live in a child process (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        config = read_config(settings.checkpoint)  # a missing or broken config fails here, at once
        if settings.threads is None:  # as vLLM's CPU backend does: one core stays with the HTTP side
            settings = settings.model_copy(update={"threads": max(1, usable_cpus() - 1)})
        self.tokenizer = CharTokenizer(config["vocab"])
        self.max_in_flight = settings.max_batch_size + settings.max_queue
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds threads
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=run_engine, args=(settings, child_conn),
                                        name="caesar-engine", daemon=True)
        self._process.start()
        child_conn.close()
        self._card = self._wait_until_loaded()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _handles, between the event loop and the reader
        self._handles: dict[int, _RemoteHandle] = {}
        self._ids = itertools.count()
        self._reader: threading.Thread | None = None
        self._dead = False
        self._stopping = False
        self.queue_size = 0
        self.running_rows = 0

    def _wait_until_loaded(self) -> dict[str, Any]:
        if not self._conn.poll(LOAD_TIMEOUT_S):
            self._process.kill()
            raise EngineProcessError(f"the engine process did not load in {LOAD_TIMEOUT_S:g} s")
        try:
            kind, detail = self._conn.recv()
        except EOFError:
            raise EngineProcessError(f"the engine process exited with {self._process.exitcode} "
                                     "while loading the checkpoint") from None
        if kind == "error":  # the child's CheckpointError or RuntimeError, raised again here
            self._process.join(STOP_TIMEOUT_S)
            checkpoint_problem, message = detail
            raise CheckpointError(message) if checkpoint_problem else RuntimeError(message)
        return detail

    # -- State, readable from any thread --

    @property
    def alive(self) -> bool:
        return not self._dead and (self._process.is_alive() or self._stopping)

    def model_card(self) -> dict[str, Any]:
        return dict(self._card)

    # -- Lifecycle --

    def start(self) -> None:
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, name="caesar-engine-reader", daemon=True)
            self._reader.start()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        self.check_accepting()
        with self._lock:
            if len(self._handles) >= self.max_in_flight:
                raise QueueFull()
            handle = _RemoteHandle(next(self._ids), self)
            self._handles[handle.request_id] = handle
        self._send(("submit", handle.request_id, request))
        return handle

    async def drain(self, timeout_s: float) -> None:
        self._draining = True
        await drain_in_flight(lambda: len(self._handles), lambda failure: self._send(("abort", failure)),
                              lambda: self.alive, timeout_s)

    def shutdown(self) -> None:
        self._stopping = True
        self._send(("stop",))
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            logger.warning("the engine process did not stop in %.0f s; killing it", STOP_TIMEOUT_S)
            self._process.kill()
            self._process.join()

    # -- Both directions of the pipe --

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):  # the child is gone; the reader reports it
            pass

    def _cancel(self, request_id: int) -> None:
        """The client left: forget the request (its place counts no more) and free its row."""
        with self._lock:
            self._handles.pop(request_id, None)
        self._send(("cancel", request_id))

    def _read(self) -> None:
        """The reader thread: hand each message's events to their requests' event loops."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "events":
                _, items, (self.queue_size, self.running_rows) = message
                self._dispatch(items)
            elif kind == "ready":
                self._ready = True
            elif kind == "died":
                logger.error("the engine process failed: %s", message[1])
                break
        self._dead = not self._stopping
        if self._dead:
            logger.error("the engine process is gone (exit code %s)", self._process.exitcode)
        with self._lock:
            stopped = [Failed("generation", "the generation engine stopped")]
            orphans = [(handle, stopped) for handle in self._handles.values()]
            self._handles.clear()
        to_event_loops(orphans)

    def _dispatch(self, items: list[tuple[int, list]]) -> None:
        deliveries = []
        with self._lock:
            for request_id, events in items:
                handle = self._handles.get(request_id)
                if handle is None:  # cancelled: nobody listens
                    continue
                if isinstance(events[-1], Finished | Failed):
                    del self._handles[request_id]
                deliveries.append((handle, events))
        to_event_loops(deliveries)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class _Forwarded:
    """A request's handle in the engine process: its id, and whether its client left."""

    __slots__ = ("request_id", "cancelled")

    def __init__(self, request_id: int) -> None:
        self.request_id = request_id
        self.cancelled = False


def run_engine(settings: Settings, conn: Connection) -> None:
    """The engine process: load, warm up, then serve the pipe until told to stop or the parent goes."""
    # The parent decides when to stop (its first signal drains); a Ctrl-C reaches the whole group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from service.__main__ import configure_logging
    configure_logging(settings.log_level)
    handles: dict[int, _Forwarded] = {}
    last_state: tuple[int, int] | None = None

    def forward(deliveries: Deliveries) -> None:
        nonlocal last_state
        state = (engine.queue_size, engine.running_rows)
        if not deliveries and state == last_state:
            return
        last_state = state
        items = []
        for handle, events in deliveries:
            items.append((handle.request_id, events))
            if isinstance(events[-1], Finished | Failed):
                handles.pop(handle.request_id, None)
        conn.send(("events", items, state))

    try:
        # The parent admits (429 when full). A cancelled request leaves its count at once but holds
        # its row here for up to two more steps, so this engine's own bound sits a batch above it.
        engine = Engine.from_settings(settings, on_events=forward,
                                      max_queue=settings.max_queue + settings.max_batch_size)
    except (CheckpointError, RuntimeError) as error:
        conn.send(("error", (isinstance(error, CheckpointError), str(error))))
        return
    conn.send(("loaded", engine.model_card()))
    engine.start()
    while not engine.ready:
        if not engine.alive:
            conn.send(("died", "the warm-up failed"))
            return
        time.sleep(0.05)
    conn.send(("ready",))
    while engine.alive:
        try:
            if not conn.poll(ALIVE_CHECK_S):
                continue
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            break
        kind = message[0]
        if kind == "submit":
            _, request_id, request = message
            handle = handles[request_id] = _Forwarded(request_id)
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
    else:
        conn.send(("died", "the scheduler thread stopped"))
    engine.shutdown()
