"""/v1/embeddings: inputs -> pooled engine requests, scheduled with generation; vectors -> the response."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Awaitable, Callable

import numpy as np

from pllm.runtime.engine.outputs import EmbeddingRequestOutput
from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.server.protocol_embeddings import EmbeddingRequest
from pllm.runtime.server.protocol_responses import EmbeddingData, EmbeddingResponse, UsageInfo
from pllm.runtime.server.request_stream import EngineError, EngineRequest
from pllm.runtime.server.serving import OpenAIServing


class EmbeddingServing:
    """The embeddings endpoint family over the shared model context."""

    def __init__(self, base: OpenAIServing) -> None:
        self.base = base

    async def create(
        self, req: EmbeddingRequest, arrival: float, until_disconnect: Callable[..., Awaitable[object]]
    ) -> object:
        """One engine request per input, scheduled like completions (token budget, queue bound); the response
        is awaited through until_disconnect(stream, work), which aborts them all if the client leaves."""
        requests = await self._embedding_requests(req, arrival)
        stream = await self.base.engine.generate(requests)
        return await until_disconnect(stream, self._embedding_response(req, requests, stream))

    async def _embedding_requests(self, req: EmbeddingRequest, arrival: float) -> list[EngineRequest]:
        hidden_size = self.base.hidden_size
        if req.dimensions is not None and req.dimensions != hidden_size:
            raise EngineError(400, f"dimensions={req.dimensions} is not supported; this model gives {hidden_size}",
                              param="dimensions")
        base_id = f"embd-{uuid.uuid4().hex}"
        requests = []
        for i, item in enumerate(req.inputs()):
            if isinstance(item, str):
                # an empty text is tokenized, not refused: an encoder's tokenizer makes it [CLS] [SEP], which
                # sentence-transformers embeds; only an input with no tokens at all is refused below
                if item:
                    self.base.check_chars(item, param="input")
                item = await self.base.in_tokenizer_thread(self.base.encode_for_embedding, item)
            else:
                self.base.check_token_ids(item, "input")
            if not item:
                raise EngineError(400, "The input is empty (it has no tokens); provide a non-empty input.",
                                  param="input")
            requests.append(EngineRequest(f"{base_id}-{i}", list(item), SamplingParams(), arrival,
                                          pooling=self.base.default_pooling))
        return requests

    async def _embedding_response(
        self, req: EmbeddingRequest, requests: list[EngineRequest], stream
    ) -> EmbeddingResponse:
        index = {r.request_id: i for i, r in enumerate(requests)}
        results: list = [None] * len(requests)
        async for out in stream:
            if not isinstance(out, EmbeddingRequestOutput):  # aborted by a shutdown that outlasted its timeout
                raise EngineError(503, "The server is shutting down.", retry_after_s=5)
            results[index[out.request_id]] = out.outputs
        data = []
        for i, r in enumerate(results):
            if req.encoding_format == "base64":
                vec = base64.b64encode(np.asarray(r.embedding, dtype="<f4").tobytes()).decode()
            else:
                vec = r.embedding
            data.append(EmbeddingData(index=i, embedding=vec))
        num_tokens = sum(r.num_prompt_tokens for r in results)
        return EmbeddingResponse(
            id=requests[0].request_id.rsplit("-", 1)[0],
            model=self.base.model_name,
            data=data,
            usage=UsageInfo(prompt_tokens=num_tokens, completion_tokens=0, total_tokens=num_tokens),
        )
