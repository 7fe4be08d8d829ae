"""RequestGuard: the ASGI layer before the app: X-Request-Id, body-size and body-time limits, the Bearer key."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import uuid

from starlette.exceptions import HTTPException as StarletteHTTPException

from pllm.runtime.server.limits import usable_request_id
from pllm.runtime.server.sse import error_response


class RequestGuard:
    """Pure ASGI middleware (streaming-safe): X-Request-Id, the body-size and body-time limits, the Bearer key.

    The key guards /v1/* only: /health, /version, /metrics, /tokenize, /detokenize and the OpenAPI docs stay
    open (as in vLLM) so orchestrators and scrapers need no secret; bind to loopback or put a proxy in front to
    hide them.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int, request_body_timeout_s: float):
        self.app = app
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.request_body_timeout_s = request_body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")
        if not usable_request_id(request_id):
            request_id = uuid.uuid4().hex

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        reply = None
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            reply = error_response(400, "Invalid Content-Length header.")
        elif int(length) > self.max_body_bytes:
            reply = error_response(413, f"Request body is larger than the {self.max_body_bytes}-byte limit.")
        elif self.key_digest is not None and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            given = headers.get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(hashlib.sha256(token).digest(), self.key_digest):
                reply = error_response(401, "Invalid or missing API key (send 'Authorization: Bearer <key>').")
        if reply is not None:
            return await reply(scope, receive, send_with_id)

        num_bytes, body_done = 0, False
        deadline = asyncio.get_running_loop().time() + self.request_body_timeout_s

        async def receive_limited():
            nonlocal num_bytes, body_done
            if body_done:  # later receives only wait for a disconnect, which may take as long as generating
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:  # a slow-body client would otherwise hold its connection and task forever
                timeout = self.request_body_timeout_s
                message = f"The request body did not arrive within {timeout:g} s."
                raise StarletteHTTPException(408, message, headers={"Connection": "close"}) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            if message["type"] == "http.request":
                num_bytes += len(message.get("body", b""))
                if num_bytes > self.max_body_bytes:  # chunked bodies carry no Content-Length
                    limit = self.max_body_bytes
                    raise StarletteHTTPException(413, f"Request body is larger than the {limit}-byte limit.")
            return message

        await self.app(scope, receive_limited, send_with_id)
