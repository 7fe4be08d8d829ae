"""vLLM's LLM arguments and prompt forms, read as pllm's (runtime/engine/llm.py's LLM takes them): keyword aliases,
the dtype a script names, the arguments with no counterpart here (refused with the reason)."""

from __future__ import annotations

import os
from typing import TypedDict

from pllm.runtime.engine.config import EngineConfig


class TextPrompt(TypedDict):
    """vLLM's TextPrompt: {"prompt": text}. A plain dict does as well."""

    prompt: str


class TokensPrompt(TypedDict):
    """vLLM's TokensPrompt: {"prompt_token_ids": [...]}. A plain dict does as well."""

    prompt_token_ids: list[int]


# vLLM's LLM keyword arguments that name an EngineConfig field under another name: gpu_memory_utilization is read
# as pllm-serve's --gpu-memory-utilization is (the fraction of free device memory, or of available RAM on a cpu
# run, the KV cache takes), kv_cache_memory_bytes is the KV cache's size in bytes.
_VLLM_ALIASES = {"gpu_memory_utilization": "kv_cache_fraction", "kv_cache_memory_bytes": "kv_cache_memory"}
# dtype names vLLM takes (torch.dtype objects too) -> the build's manifest name
_DTYPES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16", "half": "float16"}
RUNNERS = ("auto", "generate", "pooling")
# vLLM LLM arguments with no counterpart here, and why: named in the refusal
_NO_COUNTERPART = {
    "quantization": "a build's quantization is chosen when it is compiled (pllm-compile --quantization)",
    "max_lora_rank": "adapters of rank up to 64 are taken; no smaller cap can be set",
    "swap_space": "preempted sequences are recomputed, never swapped to host memory",
    "cpu_offload_gb": "weights are not offloaded",
    "revision": "a build is a local folder; pick the revision when compiling it",
    "task": "pass runner='generate' or runner='pooling' (vLLM's current name)",
}
PROMPT_KEYS = ("prompt", "prompt_token_ids")


def check_prompt_keys(prompt: dict, where: str) -> None:
    """ValueError naming a prompt dict's keys pllm would otherwise drop unseen (multi_modal_data, cache_salt, ...)."""
    extra = sorted(map(str, set(prompt) - set(PROMPT_KEYS)))
    if extra:
        raise ValueError(f"{where}: prompt key(s) {', '.join(map(repr, extra))} are not supported; a prompt dict "
                         f"takes {' or '.join(map(repr, PROMPT_KEYS))}")


def vllm_settings(model: object, tokenizer: object, trust_remote_code: object, runner: object, enable_lora: object,
                  engine_settings: dict) -> dict:
    """LLM's keyword arguments checked, and engine_settings with vLLM's names read as EngineConfig's: ValueError or
    TypeError naming what is wrong or has no counterpart here."""
    engine_settings = dict(engine_settings)
    for name, value in (("trust_remote_code", trust_remote_code), ("enable_lora", enable_lora)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}; got {runner!r}")
    for theirs, ours in _VLLM_ALIASES.items():
        if theirs in engine_settings:
            if ours in engine_settings:
                raise TypeError(f"{theirs} and {ours} name the same engine setting; give one")
            engine_settings[ours] = engine_settings.pop(theirs)
    if "seed" in engine_settings and engine_settings["seed"] is None:
        del engine_settings["seed"]
    unknown = set(engine_settings) - set(EngineConfig.__dataclass_fields__)
    if unknown:
        reasons = "".join(f"; {k}: {_NO_COUNTERPART[k]}" for k in sorted(unknown) if k in _NO_COUNTERPART)
        raise TypeError(
            f"unknown engine setting(s) {', '.join(sorted(unknown))}{reasons}; "
            f"known: {', '.join([*EngineConfig.__dataclass_fields__, *_VLLM_ALIASES])}"
        )
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be the path of a pllm build folder, got {type(model).__name__}")
    if tokenizer is not None and (
        not isinstance(tokenizer, (str, os.PathLike))
        or os.path.realpath(tokenizer) != os.path.realpath(model)
    ):
        raise ValueError(f"tokenizer={tokenizer!r}: a pllm build serves the tokenizer it was compiled with; "
                         "another cannot be swapped in (leave tokenizer unset, or compile a build from it)")
    return engine_settings


def check_dtype(model: str, dtype: object) -> None:
    """A dtype a vLLM script names must be the build's own: pllm does not convert weights when it loads them."""
    from pllm.compiler.manifest import open_build

    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: must be 'auto' or one of {', '.join(_DTYPES)}")
    built = open_build(model, verify=False).dtype
    if _DTYPES[name] != built:
        raise ValueError(f"dtype={dtype!r}: this build's weights are {built}, chosen when it was compiled; pass "
                         f"dtype='auto', or compile a build with pllm-compile --dtype {_DTYPES[name]}")

