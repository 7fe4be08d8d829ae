"""EngineConfig: every engine setting in one validated dataclass, passed down explicitly."""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("auto", "cpu", "cuda", "interpret")


@dataclass(frozen=True)
class EngineConfig:
    backend: str = "auto"  # auto | cpu | cuda | interpret
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int | None = None  # None: the build's block size (kernels are specialised to it)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    kv_cache_memory: int | None = None  # bytes for the KV cache; None: kv_cache_fraction of free memory
    kv_cache_fraction: float = 0.9  # fraction of device memory (GPU) or of available RAM (cpu, capped)
    enable_prefix_caching: bool = True
    seed: int = 0
    num_threads: int | None = None  # cpu backend: torch intra-op threads (None: torch's default)

    def __post_init__(self) -> None:
        def bad(name: str, value: object, what: str) -> ValueError:
            return ValueError(f"engine setting {name}={value!r}: must be {what}")

        if self.backend not in BACKENDS:
            raise bad("backend", self.backend, f"one of {', '.join(BACKENDS)}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise bad(name, value, "a positive integer")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise bad("max_model_len", self.max_model_len, "a positive integer")
        if self.block_size is not None and self.block_size not in (8, 16, 32, 64, 128):
            raise bad("block_size", self.block_size, "one of 8, 16, 32, 64, 128")
        if self.kv_cache_memory is not None and (not isinstance(self.kv_cache_memory, int) or self.kv_cache_memory < 1):
            raise bad("kv_cache_memory", self.kv_cache_memory, "a positive number of bytes")
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise bad("kv_cache_fraction", self.kv_cache_fraction, "in (0, 1]")
