"""LoRARequest (which adapter a request runs under) and the engine's registry of loaded adapters and their slots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pllm.models.lora import MAX_LORAS, LoraAdapter, LoraError, check_lora_family, check_lora_name, read_adapter
from pllm.models.spec import ModelSpec


@dataclass(frozen=True, init=False)
class LoRARequest:
    """A PEFT LoRA adapter by name, as vLLM's: `id` a positive integer the caller picks, `path` its folder
    (adapter_config.json + adapter_model.safetensors). An adapter already loaded under this name is used as it is
    (its path must then be the same or empty). Positionally (name, id, path) as vLLM's; vLLM's keyword and attribute
    names (lora_name, lora_int_id, lora_path) are taken too."""

    name: str
    id: int
    path: str = ""

    def __init__(self, name: str | None = None, id: int | None = None, path: str | None = None, *,
                 lora_name: str | None = None, lora_int_id: int | None = None, lora_path: str | None = None) -> None:
        fields = (("name", name, "lora_name", lora_name), ("id", id, "lora_int_id", lora_int_id),
                  ("path", path, "lora_path", lora_path))
        for ours, value, theirs, alias in fields:
            if value is not None and alias is not None:
                raise TypeError(f"LoRARequest: {ours} and {theirs} name the same field; give one")
            value = alias if value is None else value
            if value is None and ours != "path":
                raise TypeError(f"LoRARequest: missing {ours} (or vLLM's {theirs})")
            object.__setattr__(self, ours, "" if value is None else value)
        self.__post_init__()

    @property
    def lora_name(self) -> str:
        return self.name

    @property
    def lora_int_id(self) -> int:
        return self.id

    @property
    def lora_path(self) -> str:
        return self.path

    def __post_init__(self) -> None:
        check_lora_name(self.name)
        if type(self.id) is not int or self.id < 1:
            raise LoraError(f"LoRARequest {self.name!r}: id {self.id!r} must be a positive integer")
        if not isinstance(self.path, str):
            raise LoraError(f"LoRARequest {self.name!r}: path must be a string, got {type(self.path).__name__}")


class LoraRegistry:
    """The adapters an engine has loaded, each in a fixed slot (1, 2, ...; 0 is the base model). Adapters are only
    added, never replaced, so a slot and a name mean the same weights for the engine's life (the prefix cache
    keys on the name)."""

    def __init__(self, spec: ModelSpec, max_loras: int = MAX_LORAS):
        if type(max_loras) is not int or not 1 <= max_loras <= MAX_LORAS:
            raise LoraError(f"max_loras={max_loras!r}: must be an integer in [1, {MAX_LORAS}]")
        self.spec = spec
        self.max_loras = max_loras
        self.adapters: list[LoraAdapter] = []
        self.requests: dict[str, LoRARequest] = {}

    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.adapters)

    def slot_of(self, request: LoRARequest) -> int | None:
        """The slot of an already loaded adapter, or None; LoraError when the name is loaded from another path."""
        for i, adapter in enumerate(self.adapters):
            if adapter.name == request.name:
                if request.path and Path(request.path).resolve() != Path(adapter.path).resolve():
                    raise LoraError(f"LoRA adapter {request.name!r} is already loaded from {adapter.path}, not "
                                    f"{request.path}")
                return i + 1
        return None

    def load(self, request: LoRARequest) -> LoraAdapter:
        """Read and check a new adapter (not yet added: `add` makes it live once the runner holds it)."""
        check_lora_family(self.spec)
        if len(self.adapters) >= self.max_loras:
            raise LoraError(f"cannot load LoRA adapter {request.name!r}: {self.max_loras} adapters are loaded, "
                            f"the limit (max_loras)")
        if not request.path:
            raise LoraError(f"LoRA adapter {request.name!r} is not loaded and the request gives no path")
        return read_adapter(request.name, request.path, self.spec)

    def add(self, request: LoRARequest, adapter: LoraAdapter) -> int:
        self.adapters.append(adapter)
        self.requests[request.name] = request
        return len(self.adapters)

    def load_starting(self, packed: list[tuple[str, str]], modules: list[tuple[str, str]]) -> None:
        """A build's packed adapters, then the configured ones, as (name, folder): read, checked and added in
        order, slots 1, 2, ...; ValueError when a name repeats."""
        starting = packed + modules
        if len({name for name, _ in starting}) != len(starting):
            raise ValueError(f"LoRA adapter names must be distinct; the build packs {[n for n, _ in packed]} and "
                             f"lora_modules names {[n for n, _ in modules]}")
        for i, (name, path) in enumerate(starting):
            request = LoRARequest(name, i + 1, path)
            self.add(request, self.load(request))
