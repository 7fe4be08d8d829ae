"""Tensor parallelism, the tensor side: a rank's slice of each runtime tensor, the communicator a model calls after
its row-parallel layers and for its vocabulary-parallel embedding and LM head (the layout: parallel_layout.py)."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from pllm.models.parallel_layout import Split, kv_heads_of
from pllm.models.spec import ModelSpec


def _chunk(t: torch.Tensor, dim: int, size: int, rank: int) -> torch.Tensor:
    return t.chunk(size, dim=dim)[rank]


def shard_tensor(t: torch.Tensor, split: Split, spec: ModelSpec, size: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s part of a whole runtime tensor of `spec` (the full model's spec)."""
    if size == 1 or split is Split.REPLICATED:
        return t
    if split is Split.VOCAB:
        return _chunk(t, 0, size, rank)
    if split is Split.COLUMNS:
        return _chunk(t, -1, size, rank)
    if split is Split.GATE_UP:
        gate, up = t.chunk(2, dim=-2)
        return torch.cat([_chunk(gate, -2, size, rank), _chunk(up, -2, size, rank)], dim=-2)
    # QKV: dim 0 of a weight [q + 2 kv, hidden] or a bias [q + 2 kv]
    q_size, kv_size, d = spec.q_size, spec.kv_size, spec.head_dim
    q, k, v = t[:q_size], t[q_size : q_size + kv_size], t[q_size + kv_size :]
    heads = kv_heads_of(spec, size, rank)
    rows = slice(heads.start * d, heads.stop * d)
    return torch.cat([_chunk(q, 0, size, rank), k[rows], v[rows]], dim=0)


class Communicator(Protocol):
    """What a model calls when it runs split over ranks; every rank calls the same methods in the same order."""

    rank: int
    world_size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over all ranks (x may be reused for the result); x itself when world_size is 1."""
        ...

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] from each rank -> [..., world_size * n], rank order along the last dim."""
        ...


class SingleRank:
    """The communicator of a model that is not split: nothing crosses a process."""

    rank = 0
    world_size = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return x


SINGLE_RANK = SingleRank()


def vocab_embedding(input_ids: torch.Tensor, weight: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """The token embedding from a vocabulary slice per rank: each rank looks up the ids it holds (zeros for the
    others) and the all-reduce sums the one row each token has; the whole table on a single rank."""
    if comm.world_size == 1:
        return F.embedding(input_ids, weight)
    per = weight.shape[0]
    start = comm.rank * per
    local = input_ids - start
    outside = (local < 0) | (local >= per)
    x = F.embedding(local.masked_fill(outside, 0), weight)
    x.masked_fill_(outside.unsqueeze(-1), 0)
    return comm.all_reduce(x)
