"""The HTTP server's life: uvicorn, but SIGTERM drains the engine first, and a dead engine ends the server."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import uvicorn

from pllm.runtime.server.async_engine import AsyncEngine
from pllm.runtime.server.cli_args import address
from pllm.runtime.worker.startup_timing import Stage, mark

logger = logging.getLogger("pllm.server")

ENGINE_WATCH_INTERVAL_S = 0.25  # how often the server looks whether its engine is still alive
DEAD_ENGINE_EXIT_DELAY_S = 2.0  # seconds /health answers 503 after the engine died, before the server exits


def bound_url(host: str, sock: socket.socket) -> str:
    """The address a listening socket serves, as a client would write it: the host as given, the port bound."""
    return f"http://{address(host, sock.getsockname()[1])}"


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains (new requests 503, running ones finish) before exiting; a second
    cuts the drain short (the running requests end with finish_reason abort, as at the drain's timeout), a third
    stops at once."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, shutdown_timeout_s: float):
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout_s = shutdown_timeout_s
        self.url = ""  # http://host:port, the port the socket is bound to (--port 0: the one the system chose)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self.engine_died = False

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        self._loop = asyncio.get_running_loop()
        if self.started:
            mark(Stage.BIND)
            self.url = bound_url(self.config.host, self.servers[0].sockets[0])
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
        if self._loop is None or self.engine.hurried:  # not started yet, or a third signal: stop now
            super().handle_exit(sig, frame)
            return
        if self.engine.draining:  # a second signal: abort what runs (each answered), then exit as a drain does
            logger.info("received %s again: aborting the %d unfinished requests now", signal.Signals(sig).name,
                        self.engine.num_unfinished())
            self.engine.hurry()
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
