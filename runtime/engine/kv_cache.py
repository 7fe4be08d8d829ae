"""KVCacheManager: one KV layer group's paged blocks: ref counts, a free list, prefix caching by chained block hash,
and, for a windowed group, the return of blocks that fell out of the window."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import astuple, dataclass, replace

from pllm.models.kv_groups import KvGroup
from pllm.runtime.engine.request import BlockTable, Request


def hash_block(parent_hash: bytes, token_ids: list[int]) -> bytes:
    """sha256 over the parent block's digest and this block's tokens: a hit means the whole prefix matches.

    A cryptographic digest makes a false hit (2^-128 with 128-bit truncation) far less likely than a hardware
    fault, so a hit is trusted without comparing tokens. int64 bytes keep any vocabulary size unambiguous.
    """
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()[:16]


@dataclass(frozen=True)
class PrefixHit:
    """The longest cached prefix of a request, in whole blocks; allocate_slots takes their references."""

    block_ids: tuple[int, ...]  # [num_hit_blocks], in order from the first block
    num_tokens: int  # num_hit_blocks * block_size; always < request.num_tokens


@dataclass(frozen=True)
class PrefixCacheStats:
    """Prefix-cache lookups so far, as vLLM's PrefixCacheStats (vllm/v1/metrics/stats.py) counts them: per admitted
    request, its tokens looked up (`queries`) and those found (`hits`). A request readmitted after preemption is
    counted apart (`preempted_*`): it finds its own blocks again, which says nothing about prefix sharing, so only
    the first admissions feed the prefix_cache_queries/hits metrics and the hit rate."""

    requests: int = 0
    queries: int = 0  # tokens looked up
    hits: int = 0  # of those, tokens served from the cache
    preempted_requests: int = 0
    preempted_queries: int = 0
    preempted_hits: int = 0

    def record(self, num_tokens: int, num_hits: int, preempted: bool) -> PrefixCacheStats:
        """These stats with one more lookup (vLLM's record); preempted: request.num_preemptions > 0."""
        if preempted:
            return replace(self, preempted_requests=self.preempted_requests + 1,
                           preempted_queries=self.preempted_queries + num_tokens,
                           preempted_hits=self.preempted_hits + num_hits)
        return replace(self, requests=self.requests + 1, queries=self.queries + num_tokens, hits=self.hits + num_hits)

    def __add__(self, other: PrefixCacheStats) -> PrefixCacheStats:
        return PrefixCacheStats(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


class KVCacheManager:
    """Owns block ids only; the model runner owns the tensors they index ([num_blocks, block_size, ...]).

    Every block is in exactly one state: referenced (ref count > 0, in some requests' block tables) or free
    (ref count 0, in `_free`). A free block may still hold a registered hash: it is an evictable cached block,
    revived by a prefix hit or, when a fresh block is needed, evicted least-recently-freed first.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        group: KvGroup | None = None,
        group_index: int = 0,
    ) -> None:
        """group: the layers this pool serves (None: every layer, global attention); group_index: its place in the
        model's groups, the request.block_tables entry this manager owns."""
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.group = group if group is not None else KvGroup((), None)
        self.group_index = group_index
        # a windowed group's blocks leave tables as the window passes: a prefix hit would find holes
        assert not (enable_prefix_caching and self.group.window is not None), "prefix caching needs a global group"
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks  # [num_blocks]
        self._block_hashes: list[bytes | None] = [None] * num_blocks  # [num_blocks]; registered hash or None
        self._hash_to_block: dict[bytes, int] = {}
        # Free blocks in eviction order (first = next to hand out). Values unused: an ordered set.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Per request: hashes of its full blocks computed so far, and how many of its blocks are registered.
        self._req_hashes: dict[str, list[bytes]] = {}
        self._req_num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_stats = PrefixCacheStats()  # lookups of admitted requests (frozen: replaced, not changed)

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation could take, evictable cached blocks included."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_prefix_queries(self) -> int:
        """Tokens of first admissions looked up in the prefix cache (readmissions after preemption not counted)."""
        return self.prefix_cache_stats.queries

    @property
    def num_prefix_hits(self) -> int:
        """Of num_prefix_queries, the tokens served from the cache."""
        return self.prefix_cache_stats.hits

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> PrefixHit:
        """Longest run of cached full blocks at the start of request.all_token_ids. Has no side effects.

        The hit never covers the whole sequence: at least one token is left to compute so the step that
        finishes the prefill yields logits. Capping at (num_tokens - 1) // block_size blocks does that; when
        the sequence is fully cached and ends on a block boundary, its last block is recomputed.
        """
        if not self.enable_prefix_caching:
            return PrefixHit((), 0)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        block_ids: list[int] = []
        for h in self._hashes(request, max_hit_blocks):
            block_id = self._hash_to_block.get(h)
            if block_id is None:
                break
            block_ids.append(block_id)
        return PrefixHit(tuple(block_ids), len(block_ids) * self.block_size)

    def num_blocks_needed(self, request: Request, num_new_tokens: int, hit: PrefixHit | None = None) -> int:
        """Free blocks allocate_slots(request, num_new_tokens, hit) would take (fresh ones, and hit blocks it
        revives), after returning the blocks out of the window; changes nothing."""
        table = self.table(request)
        num_computed = hit.num_tokens if hit is not None else request.num_computed_tokens
        hit_block_ids = hit.block_ids if hit is not None else ()
        first = max(table.num_dropped, self.group.first_needed_block(num_computed, self.block_size))
        num_fresh = self.num_blocks_for(num_computed + num_new_tokens) - max(first, table.num_blocks)
        num_fresh -= len(hit_block_ids)
        # Hit blocks nobody references sit in the free list: reviving them uses free blocks too.
        num_revived = sum(1 for b in hit_block_ids if self._ref_counts[b] == 0)
        return max(num_fresh, 0) + num_revived - self._num_droppable(table, first)

    def allocate_slots(self, request: Request, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Extend the request's block table to hold num_computed + num_new_tokens tokens; False, changing nothing,
        if the free blocks do not suffice. A windowed group first returns the blocks no query from
        num_computed on can attend to.

        With `hit` (admission: the request holds no blocks), num_computed is hit.num_tokens and the hit blocks
        head the block table; the caller then sets request.num_computed_tokens = hit.num_tokens. Call it right
        after get_computed_blocks, before any other allocation could evict the hit blocks.
        """
        assert num_new_tokens >= 0
        table = self.table(request)
        hit_block_ids = hit.block_ids if hit is not None else ()
        if hit is not None:
            assert not table.block_ids and request.num_computed_tokens == 0, request.request_id
            num_computed = hit.num_tokens
        else:
            num_computed = request.num_computed_tokens
        if self.group.window is None:  # the path of every model without windows: kept as lean as it was
            num_fresh = self.num_blocks_for(num_computed + num_new_tokens) - len(table.block_ids) - len(hit_block_ids)
            # Hit blocks nobody references sit in the free list: reviving them uses free blocks too.
            num_revived = sum(1 for b in hit_block_ids if self._ref_counts[b] == 0)
            if max(num_fresh, 0) + num_revived > len(self._free):
                return False
        elif self.num_blocks_needed(request, num_new_tokens, hit) > len(self._free):
            return False
        else:
            self.release_out_of_window(request, num_computed)
            if not table.block_ids:  # a sequence starting past its window: nothing before the window is kept
                table.num_dropped = max(table.num_dropped, self.group.first_needed_block(num_computed, self.block_size))
        for block_id in hit_block_ids:
            assert self._block_hashes[block_id] is not None, "hit block evicted before allocate_slots"
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1
            table.block_ids.append(block_id)
        for _ in range(self.num_blocks_for(num_computed + num_new_tokens) - table.num_blocks):
            block_id = self._take_free_block()
            self._ref_counts[block_id] = 1
            table.block_ids.append(block_id)
        if hit is not None:
            self._req_num_cached_blocks[request.request_id] = len(hit_block_ids)
            if self.enable_prefix_caching:
                self.prefix_cache_stats = self.prefix_cache_stats.record(
                    request.num_tokens, hit.num_tokens, preempted=request.num_preemptions > 0)
        return True

    def release_out_of_window(self, request: Request, num_computed: int | None = None) -> None:
        """Return to the pool the blocks before the first one a query at position num_computed (default:
        request.num_computed_tokens, the next query) can attend to; every later query sees even less. A global
        group keeps them all."""
        if self.group.window is None:
            return
        table = self.table(request)
        if num_computed is None:
            num_computed = request.num_computed_tokens
        first = self.group.first_needed_block(num_computed, self.block_size)
        for _ in range(self._num_droppable(table, first)):
            self._release(table.block_ids.pop(0))
            table.num_dropped += 1

    @staticmethod
    def _num_droppable(table: BlockTable, first: int) -> int:
        return min(max(first - table.num_dropped, 0), len(table.block_ids))

    def table(self, request: Request) -> BlockTable:
        """The request's block table in this group (made empty on first use)."""
        tables = request.block_tables
        if len(tables) > self.group_index:
            return tables[self.group_index]
        while len(tables) <= self.group_index:
            tables.append(BlockTable())
        return tables[self.group_index]

    def cache_full_blocks(self, request: Request) -> None:
        """Register the hashes of the request's blocks that are full of computed KV.

        Call after the step that computed them, once request.num_computed_tokens has advanced (the scheduler's
        update does). A block whose hash another block already holds (two requests computed the same prefix
        at once) stays unregistered; it is freed like any private block.
        """
        if not self.enable_prefix_caching:
            return
        num_full_blocks = request.num_computed_tokens // self.block_size
        start = self._req_num_cached_blocks.get(request.request_id, 0)
        if num_full_blocks <= start:
            return
        block_ids = self.table(request).block_ids  # a global group's: none dropped
        assert num_full_blocks <= len(block_ids), request.request_id
        hashes = self._hashes(request, num_full_blocks)
        for i in range(start, num_full_blocks):
            block_id, h = block_ids[i], hashes[i]
            if self._block_hashes[block_id] is None and h not in self._hash_to_block:
                self._block_hashes[block_id] = h
                self._hash_to_block[h] = block_id
        self._req_num_cached_blocks[request.request_id] = num_full_blocks

    def trim(self, request: Request) -> None:
        """Return the table's blocks past the first num_blocks_for(num_computed_tokens): they hold only K/V of
        tokens that were rolled back (rejected drafts), never registered, since only full blocks of computed tokens
        are. Slots of rolled-back tokens in a kept block are simply written again by the next step."""
        table = self.table(request)
        keep = self.num_blocks_for(request.num_computed_tokens)
        while table.num_blocks > keep and table.block_ids:
            block_id = table.block_ids.pop()
            assert self._block_hashes[block_id] is None, f"block {block_id}: registered, past the computed tokens"
            self._release(block_id)

    def free(self, request: Request) -> None:
        """Drop the request's references; blocks reaching zero become free (cached ones stay evictable)."""
        table = self.table(request)
        # Free from the tail: tail blocks are the least likely to be shared again, so they are evicted first.
        for block_id in reversed(table.block_ids):
            self._release(block_id)
        table.block_ids = []
        table.num_dropped = 0
        self._req_hashes.pop(request.request_id, None)
        self._req_num_cached_blocks.pop(request.request_id, None)

    def _release(self, block_id: int) -> None:
        self._ref_counts[block_id] -= 1
        assert self._ref_counts[block_id] >= 0, f"block {block_id} freed twice"
        if self._ref_counts[block_id] == 0:
            self._free[block_id] = None
            if self._block_hashes[block_id] is None:
                # Nothing cached in it: hand it out before any block a later prefix could hit.
                self._free.move_to_end(block_id, last=False)

    def reset_prefix_cache(self) -> None:
        """Forget every registered hash (benchmarks, weight reloads); referenced blocks stay with owners."""
        self._hash_to_block.clear()
        self._block_hashes = [None] * self.num_blocks

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        assert self._ref_counts[block_id] == 0
        h = self._block_hashes[block_id]
        if h is not None:  # evict: its KV is about to be overwritten
            assert self._hash_to_block[h] == block_id
            del self._hash_to_block[h]
            self._block_hashes[block_id] = None
        return block_id

    def _hashes(self, request: Request, num_full_blocks: int) -> list[bytes]:
        """Chained hashes of the request's first num_full_blocks blocks, memoised per request."""
        hashes = self._req_hashes.setdefault(request.request_id, [])
        if len(hashes) < num_full_blocks:
            token_ids = request.all_token_ids
            bs = self.block_size
            assert num_full_blocks * bs <= len(token_ids)
            for i in range(len(hashes), num_full_blocks):
                parent = hashes[-1] if hashes else request.cache_salt  # a LoRA adapter's blocks are its own
                hashes.append(hash_block(parent, token_ids[i * bs : (i + 1) * bs]))
        return hashes[:num_full_blocks]
