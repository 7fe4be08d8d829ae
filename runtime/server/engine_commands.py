"""The engine thread's commands: what the event loop asks of EngineLoop (engine_loop.py), each a frozen dataclass
its dispatch matches by type."""

from __future__ import annotations

from dataclasses import dataclass

from pllm.models.lora import LoraAdapter
from pllm.runtime.engine.lora import LoRARequest
from pllm.runtime.server.request_stream import EngineRequest, Reply, RequestStream


@dataclass(frozen=True)
class AddRequests:
    """Add one HTTP request's engine requests, all or none; the stream hears Accepted or an EngineError."""

    stream: RequestStream
    requests: tuple[EngineRequest, ...]


@dataclass(frozen=True)
class Abort:
    request_ids: tuple[str, ...]


@dataclass(frozen=True)
class AbortAll:
    """Abort every live request with a final output (finish_reason abort): the drain timeout ran out."""


@dataclass(frozen=True)
class Stop:
    """Leave the loop; live requests get a 503."""


@dataclass(frozen=True)
class LoadLora:
    """Serve an adapter read and checked off this thread (LLMEngine.install_lora); the reply hears its slot or the
    LoraError, the engine then unchanged."""

    request: LoRARequest
    adapter: LoraAdapter
    reply: Reply


@dataclass(frozen=True)
class UnloadLora:
    """Stop serving the named adapter to new requests (LLMEngine.remove_lora); the reply hears its slot or the
    LoraError. Requests already added finish on it."""

    name: str
    reply: Reply


Command = AddRequests | Abort | AbortAll | Stop | LoadLora | UnloadLora
