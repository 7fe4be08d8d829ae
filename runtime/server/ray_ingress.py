"""The two ends of pllm's prefix-affinity path on Ray Serve.

`PllmIngress` is the deployment Serve's HTTP proxy calls: it reads each request's body, hashes the prompt's prefix
(ray_router.py) and forwards the request, whole, to an engine replica through a deployment handle whose router
(`PrefixAffinityRouter`) picks the replica; the response's ASGI messages stream back as they are made. A client that
disconnects cancels the call, which cancels the replica's handling and so aborts its engine requests.
A replica whose engine is dead answers `ReplicaUnavailable` before sending anything, and the ingress tries another
replica (up to MAX_ATTEMPTS), so the seconds until Serve's health check removes it cost no request.
`run_forwarded` is the replica's side: it runs the replica's own app (pllm-serve's, unchanged) on the forwarded
request and yields what the app sends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from ray import serve
from ray.serve.handle import DeploymentHandle

from pllm.runtime.server.ray_router import ForwardedRequest, ReplicaUnavailable, prefix_chain, prompt_text
from pllm.runtime.server.sse import error_response

logger = logging.getLogger("pllm.server")

MAX_ATTEMPTS = 3  # replicas a request is offered to while each answers that its engine is dead


async def run_forwarded(app, request: ForwardedRequest):
    """Run an ASGI app on a forwarded request; yield each message it sends. After the body, the app's receive waits
    for ever: a disconnect reaches the app as the cancellation of this generator, which cancels the app's task."""
    sent: asyncio.Queue = asyncio.Queue()
    body_given = False

    async def receive():
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await asyncio.Event().wait()

    async def send(message):
        await sent.put(message)

    task = asyncio.create_task(app(request.scope(), receive, send))
    task.add_done_callback(lambda _: sent.put_nowait(None))
    try:
        while (message := await sent.get()) is not None:
            yield message
        task.result()  # the app's own error, if it raised
    finally:
        task.cancel()


async def read_body(receive, limit: int, timeout_s: float) -> bytes | None:
    """The request body, cut at limit + 1 bytes (the replica's guard answers 413 for it); None if it did not arrive
    within timeout_s or the client left."""
    chunks, size = [], 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while size <= limit:
        try:
            message = await asyncio.wait_for(receive(), deadline - loop.time())
        except TimeoutError:
            return None
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if not message.get("more_body", False):
            break
    return b"".join(chunks)[: limit + 1]


class PllmIngress:
    """Serve's ingress for the affinity path: reads, hashes, forwards; no engine of its own."""

    def __init__(self, engine: DeploymentHandle, max_body_bytes: int, request_body_timeout_s: float):
        self.engine = engine.options(stream=True)
        self.max_body_bytes = max_body_bytes
        self.request_body_timeout_s = request_body_timeout_s

    def __serve_build_asgi_app__(self):
        return IngressApp(self)

    async def asgi(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        if scope["type"] != "http":
            raise ValueError(f"pllm's Ray ingress serves HTTP only, not {scope['type']!r}")
        body = await read_body(receive, self.max_body_bytes, self.request_body_timeout_s)
        if body is None:
            reply = error_response(408, "The request body did not arrive in time.", headers={"Connection": "close"})
            return await reply(scope, receive, send)
        request = ForwardedRequest(
            method=scope["method"],
            path=scope["path"],
            root_path=scope.get("root_path", ""),
            raw_path=scope.get("raw_path") or scope["path"].encode(),
            query_string=scope.get("query_string", b""),
            headers=tuple((bytes(k), bytes(v)) for k, v in scope["headers"]),
            http_version=scope.get("http_version", "1.1"),
            scheme=scope.get("scheme", "http"),
            client=tuple(scope["client"]) if scope.get("client") else None,
            body=body,
            prefix=prefix_chain(prompt_text(scope["path"], body)),
        )
        await self.forward(request, receive, send)

    async def forward(self, request: ForwardedRequest, receive, send) -> None:
        """Send the request to a replica and its response to the client; a replica with a dead engine answers before
        sending anything, and the request goes to another (the router skips those in `request.avoid`)."""
        calls = []

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            calls[-1].cancel()

        watcher = None
        started = False
        try:
            for _ in range(MAX_ATTEMPTS):
                calls.append(self.engine.handle_forwarded.remote(request))
                watcher = watcher or asyncio.create_task(watch())
                unavailable = None
                async for message in calls[-1]:
                    if isinstance(message, ReplicaUnavailable):
                        unavailable = message
                        break
                    started = started or message["type"] == "http.response.start"
                    await send(message)
                if unavailable is None:
                    return
                logger.warning("replica %s cannot serve %s (%s); trying another", unavailable.replica,
                               request.path, unavailable.reason)
                request = dataclasses.replace(request, avoid=(*request.avoid, unavailable.replica))
            reply = error_response(503, f"No replica could serve the request: the engines of {len(request.avoid)} "
                                   "replicas tried are dead.", None, 1)
            await reply(request.scope(), receive, send)
        except Exception as exc:
            if started or watcher is None or watcher.done():
                raise  # the response is cut short: the connection closes without its end
            logger.warning("request to %s failed on its replica: %r", request.path, exc)
            reply = error_response(503, f"The replica serving this request failed: {type(exc).__name__}.", None, 1)
            await reply(request.scope(), receive, send)
        finally:
            if watcher is not None:
                watcher.cancel()


class IngressApp:
    """The ingress's ASGI app object (an instance with `__call__`, as Serve's ASGI wrapper expects)."""

    def __init__(self, ingress: PllmIngress):
        self.ingress = ingress

    async def __call__(self, scope, receive, send):
        await self.ingress.asgi(scope, receive, send)


# Serve's default max_ongoing_requests (5) would cap the whole service at 5 requests in flight; the ingress holds
# only waiting coroutines, so the limits that matter are the engine replicas' (their max_ongoing_requests, and
# pllm's own queue bound behind it)
INGRESS_MAX_ONGOING_REQUESTS = 4096


def ingress_deployment(graceful_shutdown_timeout_s: float):
    """PllmIngress as a Serve deployment: zero CPUs (it only moves bytes), so it fits beside the engine replicas. It
    drains as long as the engine replicas do (--shutdown-timeout), as the streams it forwards are theirs."""
    return serve.deployment(
        serve.ingress()(PllmIngress),
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
        graceful_shutdown_timeout_s=graceful_shutdown_timeout_s,
    )
