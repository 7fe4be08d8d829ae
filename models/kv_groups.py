"""KV layer groups: the decoder layers that share one block table, by attention kind (global, or a window of W)."""

from __future__ import annotations

from dataclasses import dataclass

from pllm.models.spec import ModelSpec


@dataclass(frozen=True)
class KvGroup:
    """Layers whose K/V live in one paged pool with one block table per sequence.

    A global group keeps every block of a sequence; a windowed group may return the blocks no query can attend to
    any more (positions before the oldest key the next query sees), so it holds about window / block_size blocks
    per sequence however long the sequence grows.
    """

    layers: tuple[int, ...]  # decoder layer indices, ascending
    window: int | None  # keys a query sees, itself included (transformers' key > query - window); None: global

    def first_needed_block(self, num_computed_tokens: int, block_size: int) -> int:
        """The first block a query at position num_computed_tokens (the next one computed) may attend to: every
        block before it is out of the window of that query and of all later ones."""
        if self.window is None:
            return 0
        return max(0, num_computed_tokens - self.window + 1) // block_size

    def max_live_blocks(self, max_len: int, max_chunk: int, block_size: int) -> int:
        """The most blocks one sequence of up to max_len tokens holds at once in this group, computing at most
        max_chunk tokens a step: all of them for a global group; for a windowed one, the window behind the chunk's
        first query and the chunk itself (each of whose K/V is written), plus one block of misalignment."""
        whole = -(-max_len // block_size)
        if self.window is None:
            return whole
        return min(whole, -(-(self.window - 1 + max_chunk) // block_size) + 1)

    def describe(self) -> str:
        """For logs and errors: "layers 0-2,5 (window 512)" or "layers 3 (global)"."""
        runs: list[list[int]] = []
        for i in self.layers:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        layers = ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
        return f"layers {layers} ({'global' if self.window is None else f'window {self.window}'})"


def kv_groups(spec: ModelSpec) -> tuple[KvGroup, ...]:
    """The model's layers grouped by attention kind: the global group first (when there is one), then one group per
    window size, smallest first. A model without windows has one global group of every layer."""
    by_window: dict[int | None, list[int]] = {}
    for i in range(spec.num_hidden_layers):
        by_window.setdefault(spec.layer_window(i), []).append(i)
    order = sorted(by_window, key=lambda w: (w is not None, w or 0))
    return tuple(KvGroup(tuple(by_window[w]), w) for w in order)


def layer_groups(groups: tuple[KvGroup, ...], num_layers: int) -> tuple[int, ...]:
    """[num_layers]: the index in `groups` of each layer's group."""
    index = {layer: g for g, group in enumerate(groups) for layer in group.layers}
    assert sorted(index) == list(range(num_layers)), "every layer in exactly one group"
    return tuple(index[i] for i in range(num_layers))
