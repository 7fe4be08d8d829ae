"""pllm-serve: uvicorn and the SIGTERM drain around the OpenAI-compatible app, over the engine thread the flags
(cli_args.py) describe."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import sys
import time

import uvicorn

from pllm.runtime.server.api import create_app
from pllm.runtime.server.async_engine import AsyncEngine
from pllm.runtime.server.cli_args import build_parser, engine_config, served_names
from pllm.runtime.server.connections import ConnectionLimits, LimitedH11Protocol
from pllm.runtime.server.metrics import ServerMetrics
from pllm.runtime.worker.startup_timing import Stage, mark

logger = logging.getLogger("pllm.server")

LOG_FORMAT = "%(levelname)s %(asctime)s [%(name)s] %(message)s"
# After the drain (--shutdown-timeout): seconds uvicorn gives open connections to close before it exits. A
# supervisor's grace period (Kubernetes' terminationGracePeriodSeconds) must cover both, and engine teardown.
CONNECTIONS_CLOSE_TIMEOUT_S = 5

ENGINE_WATCH_INTERVAL_S = 0.25  # how often the server looks whether its engine is still alive
DEAD_ENGINE_EXIT_DELAY_S = 2.0  # seconds /health answers 503 after the engine died, before the server exits


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains (new requests 503, running ones finish) before exiting."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, shutdown_timeout_s: float, url: str):
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout_s = shutdown_timeout_s
        self.url = url
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self.engine_died = False

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        self._loop = asyncio.get_running_loop()
        if self.started:
            mark(Stage.BIND)
            print(f"pllm-serve: ready at {self.url} (OpenAI API under {self.url}/v1)", flush=True)
            self._watch_task = asyncio.ensure_future(self._watch_engine())

    async def _watch_engine(self) -> None:
        """An engine that died (a tensor-parallel worker killed, a bug in its loop) cannot recover: /health says
        503 for a moment, so probes and balancers see it, then the server exits non-zero for its supervisor."""
        while not self.should_exit:
            if not self.engine.is_alive and not self.engine.draining:
                logger.error("the engine died (%s); exiting in %.0f s so a supervisor restarts the server",
                             self.engine.dead_reason, DEAD_ENGINE_EXIT_DELAY_S)
                self.engine_died = True
                await asyncio.sleep(DEAD_ENGINE_EXIT_DELAY_S)
                self.should_exit = True
                return
            await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)

    def handle_exit(self, sig: int, frame) -> None:
        if self._loop is None or self.engine.draining:  # not started yet, or a second signal: stop now
            super().handle_exit(sig, frame)
            return
        logger.info(
            "received %s: draining (new requests get 503) for up to %.0f s",
            signal.Signals(sig).name,
            self.shutdown_timeout_s,
        )
        self.engine.draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await self.engine.drain(self.shutdown_timeout_s)
        finally:
            self.should_exit = True


def launch_engine(args: argparse.Namespace, names: list[str]) -> AsyncEngine:
    """The engine thread over args.build_dir, with its metrics (raises ValueError or OSError on a bad build)."""
    config = engine_config(args)
    from pllm.runtime.engine.engine import LLMEngine  # imported here so --help stays fast

    return AsyncEngine.launch(
        lambda: LLMEngine(args.build_dir, config),
        metrics=ServerMetrics(names[0]),
        max_queued_requests=args.max_queued_requests,
        log_stats_interval_s=args.log_stats_interval,
    )


def app_for(engine: AsyncEngine, args: argparse.Namespace, names: list[str]):
    """pllm's FastAPI app over a launched engine, as the flags configure it."""
    return create_app(
        engine, names, args.api_key, args.max_body_bytes, args.request_body_timeout, args.tool_call_parser
    )


def main(argv: list[str] | None = None) -> int:
    mark(Stage.IMPORTS)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, datefmt="%m-%d %H:%M:%S")
    names = served_names(args)
    start = time.perf_counter()
    try:
        engine = launch_engine(args, names)
    except (ValueError, OSError) as exc:
        print(f"pllm-serve: error: {exc}", file=sys.stderr)
        return 2
    app = app_for(engine, args, names)
    mark(Stage.APP)
    limits = ConnectionLimits(args.request_header_timeout, args.max_connections)
    host = f"[{args.host}]" if ":" in args.host else args.host
    uv_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=not args.disable_access_log,
        http=functools.partial(LimitedH11Protocol, limits=limits),
        timeout_keep_alive=args.timeout_keep_alive,
        timeout_graceful_shutdown=CONNECTIONS_CLOSE_TIMEOUT_S,
        log_config=None,  # keep our logging format
    )
    server = DrainingServer(uv_config, engine, args.shutdown_timeout, f"http://{host}:{args.port}")
    logger.info("engine ready in %.1f s; serving %s", time.perf_counter() - start, ", ".join(names))
    try:
        server.run()
    finally:
        engine.stop()
    return 0 if server.started and not server.engine_died else 1


if __name__ == "__main__":
    sys.exit(main())
