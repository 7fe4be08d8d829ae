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
    """The adapters an engine has loaded, each in a fixed slot (1, 2, ...; 0 is the base model). A slot keeps its
    adapter until the adapter is removed (pllm-serve's /v1/unload_lora_adapter) and no unfinished request runs
    under it; only then may a later load reuse the slot. Each load is numbered (load_number): the prefix cache keys
    on the name and that number, so a name loaded again, perhaps with other weights, never hits the old K/V."""

    def __init__(self, spec: ModelSpec, max_loras: int = MAX_LORAS):
        if type(max_loras) is not int or not 1 <= max_loras <= MAX_LORAS:
            raise LoraError(f"max_loras={max_loras!r}: must be an integer in [1, {MAX_LORAS}]")
        self.spec = spec
        self.max_loras = max_loras
        self.slots: list[LoraAdapter | None] = []  # slot k's adapter at index k - 1 (a removed one until reused)
        self.requests: dict[str, LoRARequest] = {}  # the adapters requests may name, by name
        self._slot_of_name: dict[str, int] = {}
        self._load_numbers: list[int] = []  # per slot, the number of the load that filled it
        self._num_loads = 0

    @property
    def adapters(self) -> tuple[LoraAdapter, ...]:
        """The adapters requests may name, in slot order."""
        return tuple(self.slots[slot - 1] for slot in sorted(self._slot_of_name.values()))

    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.adapters)

    def load_number(self, slot: int) -> int:
        return self._load_numbers[slot - 1]

    def slot_of(self, request: LoRARequest) -> int | None:
        """The slot of an already loaded adapter, or None; LoraError when the name is loaded from another path."""
        slot = self._slot_of_name.get(request.name)
        if slot is None:
            return None
        adapter = self.slots[slot - 1]
        if request.path and Path(request.path).resolve() != Path(adapter.path).resolve():
            raise LoraError(f"LoRA adapter {request.name!r} is already loaded from {adapter.path}, not {request.path}")
        return slot

    def free_slot(self, busy: frozenset[int]) -> int | None:
        """The slot a new adapter would take: the first empty one, or a removed adapter's with no request in
        `busy` (the slots unfinished requests run under), or a new one below max_loras; None when there is none."""
        live = set(self._slot_of_name.values())
        for slot in range(1, len(self.slots) + 1):
            if slot not in live and slot not in busy:
                return slot
        return len(self.slots) + 1 if len(self.slots) < self.max_loras else None

    def check_new(self, request: LoRARequest, busy: frozenset[int]) -> int:
        """The slot a new adapter would take; LoraError when its name is loaded, no slot is free, or no path."""
        check_lora_family(self.spec)
        if request.name in self._slot_of_name:
            raise LoraError(f"The lora adapter '{request.name}' has already been loaded.")
        slot = self.free_slot(busy)
        if slot is None:
            raise LoraError(f"cannot load LoRA adapter {request.name!r}: all {self.max_loras} adapter slots "
                            f"(max_loras) hold adapters that are loaded or still serving requests")
        if not request.path:
            raise LoraError(f"LoRA adapter {request.name!r} is not loaded and the request gives no path")
        return slot

    def load(self, request: LoRARequest, busy: frozenset[int] = frozenset()) -> LoraAdapter:
        """Read and check a new adapter (not yet added: `add` makes it live once the runner holds it)."""
        self.check_new(request, busy)
        return read_adapter(request.name, request.path, self.spec)

    def add(self, request: LoRARequest, adapter: LoraAdapter, slot: int) -> int:
        """Make the adapter live in `slot` (from check_new; the runner already holds it there)."""
        if slot > len(self.slots):
            self.slots.append(None)
            self._load_numbers.append(0)
        self.slots[slot - 1] = adapter
        self._num_loads += 1
        self._load_numbers[slot - 1] = self._num_loads
        self.requests[request.name] = request
        self._slot_of_name[request.name] = slot
        return slot

    def remove(self, name: str) -> int:
        """Take the adapter out of what requests may name; its slot keeps its weights for the requests still
        running under it (free_slot reuses it once they are done). -> its slot; LoraError for an unknown name."""
        slot = self._slot_of_name.pop(name, None)
        if slot is None:
            raise LoraError(f"The lora adapter '{name}' cannot be found.")
        del self.requests[name]
        return slot

    def load_starting(self, packed: list[tuple[str, str]], modules: list[tuple[str, str]]) -> None:
        """A build's packed adapters, then the configured ones, as (name, folder): read, checked and added in
        order, slots 1, 2, ...; ValueError when a name repeats."""
        starting = packed + modules
        if len({name for name, _ in starting}) != len(starting):
            raise ValueError(f"LoRA adapter names must be distinct; the build packs {[n for n, _ in packed]} and "
                             f"lora_modules names {[n for n, _ in modules]}")
        for i, (name, path) in enumerate(starting):
            request = LoRARequest(name, i + 1, path)
            self.add(request, self.load(request), i + 1)
