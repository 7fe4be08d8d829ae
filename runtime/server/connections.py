"""uvicorn's h11 protocol with a request-head deadline and a connection cap answered in OpenAI's error shape."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol

from pllm.runtime.server.sse import error_body

logger = logging.getLogger("pllm.server")


@dataclass(frozen=True)
class ConnectionLimits:
    request_header_timeout_s: float  # connect (or previous response) -> complete request head, else closed
    max_connections: int  # open connections served; a request on one past them gets 503 and a close


async def _over_capacity(scope, receive, send) -> None:
    body = json.dumps(error_body(503, "Too many open connections; retry later.")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class LimitedH11Protocol(H11Protocol):
    """uvicorn times out only idle keep-alive connections: a client that connects and stays silent, or sends
    its headers a byte at a time (slowloris), holds a connection until shutdown. This one closes any connection
    whose next request head is not complete within the deadline. (Slow bodies are guard.RequestGuard's: 408.)"""

    def __init__(self, *args, limits: ConnectionLimits, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._app = self.app
        self.app = self._serve_or_refuse
        self._head_timer = None
        self._head_cycle = None  # the request cycle current when the timer was armed

    async def _serve_or_refuse(self, scope, receive, send) -> None:
        # Counted per request, not per connection, so a connection kept open after a busy spell is served again.
        if len(self.connections) > self.limits.max_connections:
            logger.warning("refused a request: %d connections are open", len(self.connections))
            return await _over_capacity(scope, receive, send)
        return await self._app(scope, receive, send)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._head_cycle:  # a new request head was parsed
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        finished = self.cycle
        super().on_response_complete()
        # uvicorn's keep-alive timer is cancelled by the first byte of a next request, so a slow next head needs
        # this deadline too; a pipelined request already parsed (a new cycle) needs none.
        if self.cycle is finished and not self.transport.is_closing():
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_cycle = self.cycle
        self._head_timer = self.loop.call_later(self.limits.request_header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            logger.debug("closed a connection: no complete request head in %g s", self.limits.request_header_timeout_s)
            self.transport.close()
