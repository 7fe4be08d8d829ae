"""Tensor parallelism, the model side: how each runtime tensor splits across ranks, the per-rank spec, and the
communicator a model calls after its row-parallel layers and for its vocabulary-parallel embedding and LM head.

Megatron's layout, as vLLM and nano-vllm use it: the fused qkv and gate_up projections are column-parallel (each
rank holds its own q/k/v heads and its own gate and up rows), o and down are row-parallel (each rank holds the
matching input columns, and the partial outputs are summed by an all-reduce), the embedding and the LM head hold a
contiguous slice of the vocabulary each. KV heads split across ranks; with fewer KV heads than ranks each KV head
is replicated on the ranks whose query heads read it. Experts split on their intermediate dimension.
This module is torch-free (the manifest reads it); models/tensor_parallel.py holds the tensor work and the
communicator. The process-group set-up lives in the runtime (runtime/worker/parallel/).
"""

from __future__ import annotations

import dataclasses
import enum

from pllm.models.spec import ModelSpec


class Split(enum.Enum):
    """How one runtime tensor of the build's layout is divided among tensor-parallel ranks."""

    REPLICATED = "replicated"  # every rank holds all of it (norms, routers, q/k norms)
    QKV = "qkv"  # dim 0 is q rows, then k, then v: each rank its query heads and the KV heads they read
    GATE_UP = "gate_up"  # dim -2 is gate rows, then up rows: each rank its slice of both
    VOCAB = "vocab"  # dim 0 is the vocabulary: each rank a contiguous slice (embedding, LM head)
    COLUMNS = "columns"  # dim -1 is the input of a row-parallel layer (o, down): each rank a contiguous slice


class TensorParallelError(ValueError):
    """The model cannot be split over the asked number of ranks; the message names the sizes that do not divide."""


def check_split(spec: ModelSpec, size: int) -> None:
    """Every size a rank's slice is made of must divide by the number of ranks; raises naming each one that does
    not (before anything is built or started)."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise TensorParallelError(f"tensor_parallel_size={size!r}: must be a positive integer")
    if size == 1:
        return
    bad = []
    if spec.num_attention_heads % size:
        bad.append(f"num_attention_heads={spec.num_attention_heads}")
    kv = spec.num_key_value_heads
    if kv >= size and kv % size:
        bad.append(f"num_key_value_heads={kv}")
    if kv < size and size % kv:
        bad.append(f"num_key_value_heads={kv} (fewer than the ranks, so {size} must be a multiple of it to "
                   "replicate each KV head)")
    if spec.intermediate_size % size:
        bad.append(f"intermediate_size={spec.intermediate_size}")
    if spec.moe is not None and spec.moe.moe_intermediate_size % size:
        bad.append(f"moe_intermediate_size={spec.moe.moe_intermediate_size}")
    if spec.vocab_size % size:
        bad.append(f"vocab_size={spec.vocab_size}")
    if bad:
        raise TensorParallelError(
            f"{spec.model_type}: cannot split over tensor_parallel_size={size}: {', '.join(bad)} "
            f"{'is' if len(bad) == 1 else 'are'} not divisible by {size}"
        )


def rank_spec(spec: ModelSpec, size: int) -> ModelSpec:
    """The shape one rank computes: its query heads, its KV heads (at least one), its slice of the MLP. The
    vocabulary stays whole: the embedding and the LM head are sliced by the communicator's rank, not the spec."""
    check_split(spec, size)
    if size == 1:
        return spec
    moe = spec.moe
    if moe is not None:
        moe = dataclasses.replace(moe, moe_intermediate_size=moe.moe_intermediate_size // size)
    return dataclasses.replace(
        spec,
        num_attention_heads=spec.num_attention_heads // size,
        num_key_value_heads=max(1, spec.num_key_value_heads // size),
        intermediate_size=spec.intermediate_size // size,
        moe=moe,
    )


def kv_heads_of(spec: ModelSpec, size: int, rank: int) -> range:
    """The KV heads rank `rank` holds: its own slice, or the one head its query heads read when replicated."""
    kv = spec.num_key_value_heads
    if kv >= size:
        per = kv // size
        return range(rank * per, (rank + 1) * per)
    head = rank // (size // kv)
    return range(head, head + 1)


def vocab_range(vocab_size: int, size: int, rank: int) -> tuple[int, int]:
    """[start, end) of the token ids a rank's embedding and LM-head slice hold."""
    per = vocab_size // size
    return rank * per, (rank + 1) * per
