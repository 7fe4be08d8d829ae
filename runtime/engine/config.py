"""EngineConfig: every engine setting in one validated dataclass, passed down explicitly."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

BACKENDS = ("auto", "cpu", "cuda", "interpret")
MAX_LORAS_LIMIT = 16  # models/lora.py's MAX_LORAS (this module imports nothing of the model; a test ties them)
SPECULATIVE_METHODS = ("ngram",)  # drafting without a second model: prompt lookup
MAX_SPECULATIVE_TOKENS = 16  # a verify step's rows grow with it, and n-gram runs past ~10 tokens are rare
DEFAULT_PROMPT_LOOKUP = 5  # vLLM's choice when neither prompt_lookup_min nor prompt_lookup_max is given


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding by n-gram (prompt lookup) drafting, spelled as vLLM's speculative_config.

    Each decode step of a sequence proposes up to num_speculative_tokens tokens: the ones that followed the latest
    earlier occurrence of the sequence's last n tokens (n from prompt_lookup_max down to prompt_lookup_min), and
    the model verifies them in the same step."""

    method: str = "ngram"
    num_speculative_tokens: int = 0
    prompt_lookup_max: int | None = None  # None: prompt_lookup_min, or 5 when neither is given (vLLM's rule)
    prompt_lookup_min: int | None = None  # None: prompt_lookup_max, or 5 when neither is given

    def __post_init__(self) -> None:
        def bad(name: str, value: object, what: str) -> ValueError:
            return ValueError(f"speculative_config {name}={value!r}: must be {what}")

        if self.method not in SPECULATIVE_METHODS:
            raise bad("method", self.method, f"one of {', '.join(SPECULATIVE_METHODS)} (no draft model is supported)")
        k = self.num_speculative_tokens
        if not _is_int(k) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise bad("num_speculative_tokens", k, f"an integer in [1, {MAX_SPECULATIVE_TOKENS}]")
        for name in ("prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise bad(name, value, "a positive integer")
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        if low is None and high is None:
            low = high = DEFAULT_PROMPT_LOOKUP
        low = high if low is None else low
        high = low if high is None else high
        if low > high:
            raise bad("prompt_lookup_min", low, f"at most prompt_lookup_max={high}")
        object.__setattr__(self, "prompt_lookup_min", low)
        object.__setattr__(self, "prompt_lookup_max", high)

    @classmethod
    def from_dict(cls, value: Mapping) -> SpeculativeConfig:
        """vLLM's dict spelling ({"method": "ngram", "num_speculative_tokens": 4, ...}); unknown keys are named."""
        if not isinstance(value, Mapping):
            raise ValueError(f"speculative_config must be a dict or a SpeculativeConfig, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(map(repr, unknown))}; known: "
                             f"{', '.join(sorted(known))}")
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config: num_speculative_tokens is required")
        return cls(**value)


@dataclass(frozen=True)
class EngineConfig:
    backend: str = "auto"  # auto | cpu | cuda | interpret
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    kv_cache_memory: int | None = None  # bytes for the KV cache; None: kv_cache_fraction of free memory
    kv_cache_fraction: float = 0.9  # fraction of device memory (GPU) or of available RAM (cpu, capped)
    enable_prefix_caching: bool = True
    seed: int = 0
    num_threads: int | None = None  # cpu backend: torch intra-op threads (None: torch's default)
    enforce_eager: bool = False  # cuda backend: never capture decode steps as CUDA graphs
    # cpu backend: the weights read into memory on 2 MiB pages (runtime/worker/huge_pages.py) rather than mapped from
    # the file, and the bf16 panels the decode step reads moved into 2 MiB pages (huge_page_memory.collapse): batch-1
    # decode 1.0x (SmolLM2) to 1.07-1.13x (1.17B bf16) faster; start-up slower by reading them (SmolLM2's 270 MB took
    # ~0.35 s on the dev VM, whose fresh memory is slow) and moving the panels (~3 s a GB there), and a private copy
    # per process
    huge_pages: bool = False
    cuda_graph_sizes: tuple[int, ...] | None = None  # decode batch sizes to capture (None: 1, 2, 4, 8, 16, 24, ...)
    # LoRA adapters to load at start, (name, PEFT adapter folder) each, beside those packed in the build
    lora_modules: tuple[tuple[str, str], ...] = ()
    max_loras: int = 8  # adapters the engine may hold at once (build, lora_modules and LLM.generate's together)
    # ranks the model runs split over (processes: this one and N - 1 workers; one GPU each on cuda); must be the
    # build's (pllm-compile --tensor-parallel-size)
    tensor_parallel_size: int = 1
    # None: no speculative decoding; a dict in vLLM's spelling is read into a SpeculativeConfig
    speculative_config: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        def bad(name: str, value: object, what: str) -> ValueError:
            return ValueError(f"engine setting {name}={value!r}: must be {what}")

        if self.backend not in BACKENDS:
            raise bad("backend", self.backend, f"one of {', '.join(BACKENDS)}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise bad(name, value, "a positive integer")
        if self.max_model_len is not None and (not _is_int(self.max_model_len) or self.max_model_len < 1):
            raise bad("max_model_len", self.max_model_len, "a positive integer")
        if self.kv_cache_memory is not None and (not _is_int(self.kv_cache_memory) or self.kv_cache_memory < 1):
            raise bad("kv_cache_memory", self.kv_cache_memory, "a positive number of bytes")
        if not _is_int(self.seed):
            raise bad("seed", self.seed, "an integer")
        if self.num_threads is not None and (not _is_int(self.num_threads) or self.num_threads < 1):
            raise bad("num_threads", self.num_threads, "a positive integer")
        for name in ("enable_prefix_caching", "enforce_eager", "huge_pages"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, getattr(self, name), "true or false")
        if self.cuda_graph_sizes is not None:
            sizes = self.cuda_graph_sizes
            if not isinstance(sizes, (tuple, list)) or not sizes or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes
            ):
                raise bad("cuda_graph_sizes", sizes, "a non-empty tuple of positive integers (decode batch sizes)")
            if max(sizes) > self.max_num_seqs:
                raise bad("cuda_graph_sizes", sizes, f"at most max_num_seqs={self.max_num_seqs}, the largest batch")
            object.__setattr__(self, "cuda_graph_sizes", tuple(sizes))
        modules = self.lora_modules
        if not isinstance(modules, (tuple, list)) or not all(
            isinstance(m, (tuple, list)) and len(m) == 2 and all(isinstance(v, str) for v in m) for m in modules
        ):
            raise bad("lora_modules", modules, "a tuple of (name, path) pairs")
        names = [m[0] for m in modules]
        if len(set(names)) != len(names):
            raise bad("lora_modules", modules, "pairs with distinct names")
        object.__setattr__(self, "lora_modules", tuple(tuple(m) for m in modules))
        if not _is_int(self.max_loras) or not 1 <= self.max_loras <= MAX_LORAS_LIMIT:
            raise bad("max_loras", self.max_loras, f"an integer in [1, {MAX_LORAS_LIMIT}]")
        if len(modules) > self.max_loras:
            raise bad("lora_modules", f"{len(modules)} adapters", f"at most max_loras={self.max_loras}")
        if not _is_int(self.tensor_parallel_size) or self.tensor_parallel_size < 1:
            raise bad("tensor_parallel_size", self.tensor_parallel_size, "a positive integer")
        if self.tensor_parallel_size > 1 and modules:
            raise bad("lora_modules", f"{len(modules)} adapters", "empty with tensor_parallel_size > 1 (adapters are "
                      "not split across ranks)")
        if self.speculative_config is not None and not isinstance(self.speculative_config, SpeculativeConfig):
            object.__setattr__(self, "speculative_config", SpeculativeConfig.from_dict(self.speculative_config))
        fraction = self.kv_cache_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise bad("kv_cache_fraction", self.kv_cache_fraction, "in (0, 1]")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not a setting
