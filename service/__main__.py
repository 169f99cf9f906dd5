"""`python -m service [flags]`: serve a checkpoint over HTTP.

Every flag mirrors a setting of service.settings.Settings and its `CAESAR_*` environment variable;
a flag wins over the variable. A checkpoint that cannot be loaded ends the process at once with
exit code 1 and one line saying why.

Shutdown: the first SIGTERM (or Ctrl-C) drains: /ready turns 503, new requests get 503, requests in
flight have `drain_timeout_s` to finish and are then ended with an error event; the process then
exits 0. A second signal stops at once.

An engine gone for good (its first warm-up failed, its process failed to restart three times in a
row, or, with --no-engine-process, its scheduler thread died) stops the server with exit code 1 and
one line saying why, so that compose or Kubernetes start it again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
import typing
from types import FrameType

import uvicorn
from pydantic import ValidationError
from sse_starlette.sse import AppStatus

from gpt import CheckpointError
from service.app import create_app
from service.engine import Engine, EngineLike
from service.engine_process import EngineProcess, EngineProcessError, describe
from service.settings import DEFAULT_CHECKPOINT, Settings

logger = logging.getLogger("service")

UVICORN_GRACE_S = 5  # after our own drain, how long uvicorn waits for connections to close
FATAL_EXIT_GRACE_S = 30  # once the engine is gone for good, the longest uvicorn may take to stop


def build_parser() -> argparse.ArgumentParser:
    """One flag per setting, named after it (`max_batch_size` -> `--max-batch-size`)."""
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve a caesar-gpt checkpoint.")
    for name, field in Settings.model_fields.items():
        env = f"CAESAR_{name.upper()}"
        default = field.default_factory() if field.default_factory else field.default
        help_text = f"{field.description} [env {env}; default: {default if default != [] else 'none'}]"
        flag = "--" + name.replace("_", "-")
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal \
            else None
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, default=None, choices=choices, help=help_text)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")
    # The access log is one JSON object per line, nothing around it, for log shippers.
    access = logging.getLogger("service.access")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.propagate = False


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first signal drains the engine while the socket stays open (so that
    new requests get a 503 rather than a refused connection), and only then shuts uvicorn down."""

    def __init__(self, config: uvicorn.Config, engine: EngineLike, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout_s = drain_timeout_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        self.drain_task: asyncio.Task | None = None
        self.fatal: str | None = None  # why the engine is gone for good; the process then exits 1

    async def serve(self, sockets: list | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's handler: it would re-raise the signal after shutdown, and exit non-zero.
        if self.draining or self.loop is None:
            logger.warning("signal %s again: stopping now", signal.Signals(sig).name)
            self.force_exit = self.should_exit
            self.should_exit = True
            return
        self.draining = True
        logger.info("signal %s: draining for up to %.1f s", signal.Signals(sig).name, self.drain_timeout_s)
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self.drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        await self.engine.drain(self.drain_timeout_s)
        logger.info("drained; shutting down")
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's main loop, every 0.1 s: also stop the server once the engine is gone for good."""
        if self.fatal is None and not self.draining and not self.engine.alive:
            self.fatal = getattr(self.engine, "failure", None) or \
                f"the engine's scheduler thread died: {describe(getattr(self.engine, '_thread_error', None))}"
            logger.critical("stopping the server: %s", self.fatal)
            self.should_exit = True
            threading.Thread(target=exit_if_still_running, args=(FATAL_EXIT_GRACE_S,),
                             name="caesar-fatal-exit", daemon=True).start()
        return await super().on_tick(counter)


def exit_if_still_running(grace_s: float) -> None:
    """A daemon thread's last resort: end the process if uvicorn has not stopped within `grace_s`."""
    time.sleep(grace_s)
    logger.critical("the server did not stop within %.0f s; exiting now with status 1", grace_s)
    logging.shutdown()
    os._exit(1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {name: value for name, value in vars(args).items() if value is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        sys.exit(f"error: invalid settings: {error}")
    configure_logging(settings.log_level)
    try:
        engine = EngineProcess(settings) if settings.engine_process else Engine.from_settings(settings)
    except CheckpointError as error:
        hint = ""
        if settings.checkpoint == DEFAULT_CHECKPOINT and not DEFAULT_CHECKPOINT.exists():
            hint = " (scripts/train-shipped makes it)"
        sys.exit(f"error: cannot serve this checkpoint: {error}{hint}")
    except (RuntimeError, ValueError, EngineProcessError) as error:  # e.g. --device cuda without CUDA
        sys.exit(f"error: {error}")
    app = create_app(settings, engine)
    logger.info("starting: %s", json.dumps({"settings": settings.public_dict(),
                                             "model": {k: v for k, v in engine.model_card().items()
                                                       if k != "vocab"}}))
    # sse-starlette would cancel every stream on the first signal; the drain ends them instead.
    AppStatus.disable_automatic_graceful_drain()
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, timeout_graceful_shutdown=UVICORN_GRACE_S)
    server = DrainingServer(config, engine, settings.drain_timeout_s)
    server.run()
    if server.fatal is not None:
        sys.exit(f"error: {server.fatal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
