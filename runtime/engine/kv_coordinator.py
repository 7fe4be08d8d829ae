"""KvCoordinator: the scheduler's one view of the KV cache, over one block allocator per KV layer group."""

from __future__ import annotations

from pllm.runtime.engine.kv_cache import KVCacheManager, PrefixCacheStats, PrefixHit
from pllm.runtime.engine.request import Request
from pllm.runtime.worker.kv_budget import GroupBudget

NO_HIT = PrefixHit((), 0)


class KvCoordinator:
    """Allocates a request's blocks in every group at once (all or nothing), so each group's block table covers
    the same positions, less the blocks a windowed group has returned. A model without windows has one global
    group, and this is a thin pass-through to its allocator."""

    def __init__(self, managers: tuple[KVCacheManager, ...]) -> None:
        assert managers, "at least one KV group"
        assert all(m.group_index == i for i, m in enumerate(managers)), "managers in group order"
        assert len({m.block_size for m in managers}) == 1, "one block size for every group"
        self.managers = managers
        self.block_size = managers[0].block_size
        self._single = managers[0] if len(managers) == 1 else None

    @classmethod
    def single(cls, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> KvCoordinator:
        """One global group of num_blocks blocks: a model without windows."""
        return cls((KVCacheManager(num_blocks, block_size, enable_prefix_caching),))

    @classmethod
    def from_budgets(cls, budgets: tuple[GroupBudget, ...], block_size: int, enable_prefix_caching: bool
                     ) -> KvCoordinator:
        """One allocator per group; prefix caching only for a model whose every layer is global (a windowed
        group returns blocks as the window passes, so a cached prefix would have holes in it)."""
        caching = enable_prefix_caching and all(b.group.window is None for b in budgets)
        return cls(tuple(KVCacheManager(b.num_blocks, block_size, caching, b.group, i) for i, b in enumerate(budgets)))

    # -- accounting ----------------------------------------------------------------------------------
    @property
    def enable_prefix_caching(self) -> bool:
        return any(m.enable_prefix_caching for m in self.managers)

    @property
    def num_blocks(self) -> int:
        return sum(m.num_blocks for m in self.managers)

    @property
    def num_free_blocks(self) -> int:
        return sum(m.num_free_blocks for m in self.managers)

    @property
    def usage(self) -> float:
        """The fullest group's fraction of referenced blocks: the one that refuses the next allocation."""
        return max(m.usage for m in self.managers)

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Every group's lookups (only a single global group caches prefixes)."""
        if self._single is not None:
            return self._single.prefix_cache_stats
        return sum((m.prefix_cache_stats for m in self.managers), PrefixCacheStats())

    @property
    def num_prefix_queries(self) -> int:
        return self.prefix_cache_stats.queries

    @property
    def num_prefix_hits(self) -> int:
        return self.prefix_cache_stats.hits

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def check_fits(self, request_id: str, max_len: int, max_kv_len: int, max_chunk: int) -> None:
        """ValueError unless a sequence of max_kv_len tokens with KV, computed at most max_chunk tokens a step,
        fits every group when it runs alone: otherwise it could never run."""
        for m in self.managers:
            needed = m.group.max_live_blocks(max_kv_len, max_chunk, self.block_size)
            if needed > m.num_blocks:
                where = "" if self._single else f" in the KV group of {m.group.describe()}"
                raise ValueError(
                    f"request {request_id!r}: up to {max_len} tokens need {needed} KV blocks of {self.block_size} "
                    f"tokens{where}, but the cache has only {m.num_blocks}"
                )

    # -- the scheduler's calls -------------------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> PrefixHit:
        """The longest cached prefix (only a single global group caches prefixes)."""
        return self._single.get_computed_blocks(request) if self._single is not None else NO_HIT

    def allocate_slots(self, request: Request, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Every group's block table extended to num_computed + num_new_tokens tokens, or nothing changed."""
        if self._single is not None:
            return self._single.allocate_slots(request, num_new_tokens, hit)
        assert hit is None or not hit.block_ids, "no prefix hits with several groups"
        if any(m.num_blocks_needed(request, num_new_tokens) > m.num_free_blocks for m in self.managers):
            return False
        for m in self.managers:
            ok = m.allocate_slots(request, num_new_tokens)
            assert ok, m.group
        return True

    def advance(self, request: Request) -> None:
        """After a step computed the request's tokens up to num_computed_tokens: register full blocks for prefix
        hits, and return the blocks that fell out of a window (no query from here on attends to them)."""
        if self._single is not None and self._single.group.window is None:
            self._single.cache_full_blocks(request)
            return
        for m in self.managers:
            m.cache_full_blocks(request)
            m.release_out_of_window(request)

    def trim(self, request: Request) -> None:
        """Return the blocks past the request's computed tokens (a verify step's rejected drafts): every group's
        table again covers exactly num_computed_tokens positions."""
        for m in self.managers:
            m.trim(request)

    def free(self, request: Request) -> None:
        for m in self.managers:
            m.free(request)

    def reset_prefix_cache(self) -> None:
        for m in self.managers:
            m.reset_prefix_cache()

