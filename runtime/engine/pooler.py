"""Pooler: the engine's embedding requests, their pooled hidden states folded in chunk by chunk."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pllm.runtime.engine.outputs import EmbeddingOutput, EmbeddingRequestOutput
from pllm.runtime.engine.request import Pooling, Request
from pllm.runtime.engine.sampling_params import SamplingParams


@dataclass
class _PoolState:
    """An embedding request's pooled hidden state so far (a running sum over chunks for mean pooling)."""

    request: Request
    pooled: torch.Tensor | None = None  # [hidden_size] float32
    num_parts: int = 0


class Pooler:
    """Owns the unfinished embedding requests; the scheduler runs them, the runner pools each step's rows."""

    def __init__(self, normalize: bool = True) -> None:
        self._states: dict[str, _PoolState] = {}
        # L2-normalise each vector: always for decoders; for an encoder, as its sentence-transformers files say
        self.normalize = normalize

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def __len__(self) -> int:
        return len(self._states)

    def new_request(self, request_id: str, ids: list[int], pooling: str, arrival_time: float | None) -> Request:
        """The Request for an embedding of ids; ValueError for an unknown pooling. Track it once scheduled."""
        modes = [p.value for p in Pooling]
        if pooling not in modes:
            raise ValueError(f"pooling must be one of {', '.join(repr(m) for m in modes)}, got {pooling!r}")
        now = time.monotonic() if arrival_time is None else arrival_time
        return Request(request_id, ids, SamplingParams(), now, 0, pooling=Pooling(pooling))

    def track(self, request: Request) -> None:
        self._states[request.request_id] = _PoolState(request)

    def forget(self, request_id: str) -> bool:
        """Drop an aborted request; False when it is not an embedding request of this engine."""
        return self._states.pop(request_id, None) is not None

    def restart(self, request: Request) -> None:
        """A preempted request is recomputed from its first token: so is its pooled state."""
        state = self._states[request.request_id]
        state.pooled, state.num_parts = None, 0

    def fold(self, parts: dict[str, torch.Tensor], now: float) -> list[EmbeddingRequestOutput]:
        """Fold one step's pooled parts in; returns the outputs of the requests that finished."""
        outputs = []
        for request_id, part in parts.items():
            state = self._states.get(request_id)
            if state is None:
                continue  # aborted after the step was scheduled
            request = state.request
            last = request.pooling is Pooling.LAST
            if state.pooled is None or last:
                state.pooled = part
            elif request.pooling is Pooling.MEAN:
                state.pooled = state.pooled + part  # CLS keeps its first chunk's part
            state.num_parts += 1
            if not request.is_finished:
                continue
            del self._states[request_id]
            pooled = state.pooled
            if request.pooling is Pooling.MEAN and state.num_parts > 1:  # a sum over chunks; one step: its mean
                pooled = pooled / request.num_prompt_tokens
            vector = (torch.nn.functional.normalize(pooled, dim=0) if self.normalize else pooled).tolist()
            metrics = {"arrival_time": request.arrival_time, "finished_time": now}
            outputs.append(EmbeddingRequestOutput(
                request_id, request.prompt_token_ids, EmbeddingOutput(vector, request.num_prompt_tokens), True, metrics
            ))
        return outputs
