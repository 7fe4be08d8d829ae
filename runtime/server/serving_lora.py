"""LoRA adapters loaded and unloaded on a running server, as vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING does it:
POST /v1/load_lora_adapter {"lora_name", "lora_path"} and POST /v1/unload_lora_adapter {"lora_name"}.

Off by default (cli_args.runtime_lora_updating; unregistered routes answer 404, as vLLM's): a load reads whatever
folder the request names on the server's own filesystem. A load reads and checks the PEFT folder off the engine
thread (models/lora.py's read_adapter: the checks a compile-time adapter passes), then the engine thread puts the
checked tensors in a free slot between steps. An unload stops new requests naming the adapter at once (the
unknown-model 404); requests already accepted finish on its weights, and its slot is reused only once they are
done."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

from pydantic import Field

from pllm.models.lora import LoraError, read_adapter
from pllm.runtime.engine.lora import LoRARequest
from pllm.runtime.server.protocol_sampling import MAX_NAME_LEN, OpenAIModel
from pllm.runtime.server.request_stream import EngineError
from pllm.runtime.server.serving import OpenAIServing

logger = logging.getLogger("pllm.server")

MAX_PATH_LEN = 4096  # Linux's PATH_MAX


class LoadLoRAAdapterRequest(OpenAIModel):
    lora_name: Annotated[str, Field(max_length=MAX_NAME_LEN)]
    lora_path: Annotated[str, Field(max_length=MAX_PATH_LEN)]


class UnloadLoRAAdapterRequest(OpenAIModel):
    lora_name: Annotated[str, Field(max_length=MAX_NAME_LEN)] = ""
    lora_int_id: int | None = None  # vLLM's field; it too unloads by name only


class LoraServing:
    """The two endpoints over OpenAIServing's table of adapters (what check_model and /v1/models read)."""

    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving
        self.spec = serving.engine.engine.spec
        self._lock = asyncio.Lock()  # one update at a time: no two race for a name or the table
        self._next_id = max((r.id for r in serving.loras.values()), default=0) + 1

    async def load(self, body: LoadLoRAAdapterRequest) -> str:
        name, path = body.lora_name, body.lora_path
        if not name or not path:
            raise EngineError(400, "Both 'lora_name' and 'lora_path' must be provided.")
        async with self._lock:
            if name in self.serving.loras:
                raise EngineError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
            if name in self.serving.model_names:
                raise EngineError(400, f"The lora adapter name '{name}' is a served model name.", param="lora_name")
            if not Path(path).is_dir():  # vLLM's LoRAAdapterNotFoundError, a 404
                raise EngineError(404, f"Loading lora {name} failed: No adapter found for {path} (not a directory "
                                  "on the server)", param="lora_path")
            try:
                request = LoRARequest(name, self._next_id, path)
                adapter = await asyncio.get_running_loop().run_in_executor(
                    None, read_adapter, name, path, self.spec)
                await self.serving.engine.load_lora(request, adapter)
            except LoraError as exc:
                raise EngineError(400, str(exc)) from None
            self._next_id += 1
            self.serving.loras[name] = request
        logger.info("loaded LoRA adapter %r from %s", name, path)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload(self, body: UnloadLoRAAdapterRequest) -> str:
        name = body.lora_name
        if not name:
            raise EngineError(400, "'lora_name' needs to be provided to unload a LoRA adapter.")
        async with self._lock:
            if name not in self.serving.loras:
                raise EngineError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name")
            del self.serving.loras[name]  # new requests naming it: the unknown-model 404 from here on
            await self.serving.engine.unload_lora(name)
        logger.info("unloaded LoRA adapter %r", name)
        return f"Success: LoRA adapter '{name}' removed successfully."
