"""The KV-cache budget split between KV layer groups: blocks per group from bytes, and the limits that follow."""

from __future__ import annotations

from dataclasses import dataclass

from pllm.models.kv_groups import KvGroup


@dataclass(frozen=True)
class GroupBudget:
    """One KV layer group's pool, as the model runner sizes it (its tensor holds one padding block more)."""

    group: KvGroup
    num_blocks: int  # blocks the allocator hands out
    bytes_per_block: int  # K and V of every layer of the group, block_size tokens

    @property
    def num_bytes(self) -> int:
        return (self.num_blocks + 1) * self.bytes_per_block  # the padding block too


@dataclass(frozen=True)
class SchedulingLimits:
    """What bounds the blocks a windowed group can have in use at once."""

    max_num_seqs: int
    max_num_batched_tokens: int  # the most tokens one sequence computes in a step
    max_model_len: int


def windowed_need(group: KvGroup, limits: SchedulingLimits, block_size: int) -> int:
    """Blocks a windowed group never needs more of, whatever runs: each of max_num_seqs sequences holds at most
    its window behind its step's first query, plus a block of misalignment; the tokens a step computes (at most
    max_num_batched_tokens over all sequences, a block's rounding each) come on top."""
    assert group.window is not None
    per_seq = group.max_live_blocks(limits.max_model_len, 1, block_size) + 1
    return limits.max_num_seqs * per_seq + -(-limits.max_num_batched_tokens // block_size)


def split_budget(
    groups: tuple[KvGroup, ...], layer_block_bytes: int, budget: int, limits: SchedulingLimits, block_size: int
) -> tuple[GroupBudget, ...]:
    """Blocks per group from `budget` bytes (each group's tensor also holds a padding block).

    Windowed groups beside a global one get what windowed_need says they can use and the global group the rest,
    so long contexts cost only what the global layers need. When the budget is too small for that, every group
    gets the same number of blocks: a windowed table covers a subset of the global table's positions, so the
    windowed group can then never run out first either. Groups that are all windowed share the budget equally.
    Returns groups with num_blocks < 1 as they are; the caller refuses them, naming its setting.
    """
    bytes_per_block = tuple(len(g.layers) * layer_block_bytes for g in groups)
    equal = budget // sum(bytes_per_block) - 1
    counts = [equal] * len(groups)
    if groups[0].window is None and len(groups) > 1:
        wanted = [windowed_need(g, limits, block_size) for g in groups[1:]]
        rest = budget - sum((n + 1) * b for n, b in zip(wanted, bytes_per_block[1:], strict=True))
        num_global = rest // bytes_per_block[0] - 1
        if num_global >= max(wanted):
            counts = [num_global, *wanted]
    return tuple(GroupBudget(g, n, b) for g, n, b in zip(groups, counts, bytes_per_block, strict=True))


def useful_bytes(groups: tuple[KvGroup, ...], layer_block_bytes: int, limits: SchedulingLimits, block_size: int
                 ) -> int:
    """Bytes beyond which more cache cannot help: max_num_seqs sequences of max_model_len tokens at once (the
    padding blocks come out of it, as they always have)."""
    whole = limits.max_num_seqs * -(-limits.max_model_len // block_size)
    if groups[0].window is None and len(groups) > 1:
        counts = [whole, *(min(whole, windowed_need(g, limits, block_size)) for g in groups[1:])]
    else:
        counts = [whole] * len(groups)
    return sum(n * len(g.layers) * layer_block_bytes for g, n in zip(groups, counts, strict=True))


def max_tokens_held(budgets: tuple[GroupBudget, ...], max_chunk: int, block_size: int, limit: int) -> int:
    """The longest sequence (up to `limit`) every group can hold alone: a global group's blocks bound it; a windowed
    one only if its window and a chunk do not fit."""
    longest = limit
    for b in budgets:
        if b.group.max_live_blocks(limit, max_chunk, block_size) > b.num_blocks:
            longest = min(longest, b.num_blocks * block_size)
    return longest


def describe_budget(budgets: tuple[GroupBudget, ...], block_size: int) -> str:
    """One line per group, for the start-up log: layers, attention kind, blocks, tokens, bytes."""
    return "; ".join(
        f"{b.group.describe()}: {b.num_blocks} blocks x {block_size} tokens = {b.num_blocks * block_size} tokens, "
        f"{b.num_bytes} bytes ({b.num_bytes / 2**20:.2f} MiB)"
        for b in budgets
    )

