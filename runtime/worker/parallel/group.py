"""The torch.distributed process group of a tensor-parallel engine and the communicator its models call."""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pllm.runtime.worker.kv_budget import GroupBudget

# Seconds a collective may wait for the other ranks before it fails: a step, not an idle engine (idle workers wait
# on their header pipe, not in a collective), so a hung peer is reported within this bound, never waited on forever.
COLLECTIVE_TIMEOUT_S = 60.0


class WorkerDied(RuntimeError):
    """A tensor-parallel rank exited or stopped answering: the engine cannot step again; the message names it."""


@dataclass(frozen=True)
class GroupAddress:
    """Where rank 0's TCP store listens, and how the ranks talk: gloo on cpu, nccl between GPUs."""

    host: str
    port: int
    size: int
    device_type: str  # "cpu" or "cuda"

    @property
    def backend(self) -> str:
        return "nccl" if self.device_type == "cuda" else "gloo"

    def device(self, rank: int) -> torch.device:
        """The device rank `rank` owns: cuda:<rank> (one GPU per rank, on one machine), or the cpu."""
        return torch.device("cuda", rank) if self.device_type == "cuda" else torch.device("cpu")


def local_address(size: int, device_type: str) -> GroupAddress:
    """A free TCP port on this machine for the ranks' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return GroupAddress("127.0.0.1", port, size, device_type)


def _joining_key(rank: int) -> str:
    return f"pllm/rank{rank}/joining"


def host_store(address: GroupAddress) -> dist.TCPStore:
    """Rank 0's TCP store, listening at once without waiting for the other ranks (rank 0 polls joined_ranks, so
    a worker that dies before it connects fails the start at once instead of after the store's timeout)."""
    return dist.TCPStore(address.host, address.port, address.size, is_master=True,
                         timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S), wait_for_workers=False)


def joined_ranks(store: dist.TCPStore, size: int) -> bool:
    """Whether every rank beyond 0 has reached the store and is joining the group (does not block)."""
    return store.check([_joining_key(rank) for rank in range(1, size)])


def join_group(address: GroupAddress, rank: int, store: dist.TCPStore | None = None) -> None:
    """Join the default process group: rank 0 over the store it hosts (host_store), once joined_ranks says all
    the others are joining; a worker connects to it and says so first."""
    if address.device_type == "cuda":
        torch.cuda.set_device(rank)
    if store is None:
        store = dist.TCPStore(address.host, address.port, address.size, is_master=False,
                              timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        store.set(_joining_key(rank), b"1")
    dist.init_process_group(address.backend, store=store, rank=rank, world_size=address.size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class DistCommunicator:
    """models.tensor_parallel.Communicator over the default process group."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:  # every rank has the same shape, so every rank skips alike
            return x.new_empty((*x.shape[:-1], x.shape[-1] * self.world_size))
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class RankShard:
    """What a ModelRunner needs to run one rank of a split build: which rank, of how many, and its communicator."""

    rank: int
    size: int
    device: torch.device  # the device this rank owns (cuda:<rank> or the cpu); collectives' tensors live there
    comm: DistCommunicator

    def agree_budgets(self, budgets: tuple[GroupBudget, ...]) -> tuple[GroupBudget, ...]:
        """Every rank sizes its own KV pool from its free memory; all keep the smallest count of blocks per group,
        so a block id means the same slots on every rank (rank 0's scheduler hands them out)."""
        counts = torch.tensor([b.num_blocks for b in budgets], dtype=torch.int64, device=self.device)
        dist.all_reduce(counts, op=dist.ReduceOp.MIN)
        return tuple(dataclasses.replace(b, num_blocks=int(n)) for b, n in zip(budgets, counts.tolist(), strict=True))
