"""Settings a GGUF file carries that transformers' GGUF reader drops from the config it builds: RoPE's.

transformers reads a file's `{arch}.rope.freq_base` (and llama's `rope.dimension_count`, as head_dim) and no other
RoPE setting, so a model built from its config alone would rotate q and k unlike the original. Each setting is put
back as the original Hugging Face config said it:
  `{arch}.rope.scaling.type` linear + `.scaling.factor` (or the older `.rope.scale_linear`): rope type linear; for
      gemma3, its global layers' (Gemma 3 4B and larger)
  `rope_freqs.weight`: llama3 scaling. llama.cpp's converter stores only the per-frequency factors it computed, so
      the parameters are recovered by computing that tensor again, as the converter does, for the candidates below,
      and accepted only on an exact float32 match
  phi3's `rope_factors_long.weight` / `rope_factors_short.weight` + `.rope.scaling.original_context_length`:
      longrope (its attention factor, `.rope.scaling.attn_factor`, must be the one pllm derives)
  phi3's `.rope.dimension_count`: partial_rotary_factor (Phi-4-mini's 0.75)
  gemma3's `.rope.freq_base_swa`: the local layers' theta
Any other RoPE setting the file carries, or one of these pllm cannot reproduce exactly, is refused in one line
naming the key or tensor.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from pllm.compiler.gguf_reading import RopeRecord, file_rope_record

INSTEAD = "compile from the Hugging Face checkpoint instead"
# the `{arch}.rope.` keys read here (freq_base: transformers' own); any other one is refused
KNOWN_KEYS = frozenset({"freq_base", "freq_base_swa", "dimension_count", "scale_linear", "scaling.type",
                        "scaling.factor", "scaling.original_context_length", "scaling.attn_factor",
                        "scaling.finetuned"})
ROPE_FREQS, FACTORS_LONG, FACTORS_SHORT = "rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"
# llama3 candidates: Llama 3.1 factor 8, 3.2 factor 32, both low 1, high 4, original 8192; the file's own original
# length first when it gives one; a few other powers of two (an exact match of every factor is what is accepted)
LLAMA3_FACTORS = (8.0, 32.0, 16.0, 4.0, 2.0)
LLAMA3_LOW_HIGH = ((1.0, 4.0),)
LLAMA3_ORIGINALS = (8192, *(2**k for k in range(4, 21)))


class _File:
    """The GGUF file's RoPE metadata and tensors (gguf_reading.py's record of its parse)."""

    def __init__(self, path: Path, record: RopeRecord) -> None:
        self.path, self.record, self.arch = path, record, record.arch

    def rope(self, suffix: str) -> Any:
        return self.record.fields.get(self.rope_key(suffix))

    def rope_key(self, suffix: str) -> str:
        return f"{self.arch}.rope.{suffix}"

    def tensor(self, name: str) -> np.ndarray | None:
        if name not in self.record.tensors:
            return None
        type_name, shape, values = self.record.tensors[name]
        if values is None or len(shape) != 1:
            self.refuse(f"tensor '{name}'", f"is {type_name} {list(shape)}, not one F32 vector")
        return values

    def refuse(self, what: str, why: str) -> NoReturn:
        from pllm.compiler.source import ModelSourceError

        raise ModelSourceError(f"{self.path}: {what} {why}; {INSTEAD}")


def carried_settings(path: Path, config: dict) -> dict:
    """`config` (transformers' reading of the GGUF file at `path`) with the RoPE settings the file carries beside it,
    as the original Hugging Face config gave them; refuses (ModelSourceError) one pllm cannot reproduce exactly."""
    f = _File(Path(path), file_rope_record(path))
    prefix = f"{f.arch}.rope."
    for key in f.record.fields:
        if key[len(prefix):] not in KNOWN_KEYS:
            f.refuse(f"key '{key}'", "is a RoPE setting pllm does not read")
    for name in f.record.tensors:
        if name not in (ROPE_FREQS, FACTORS_LONG, FACTORS_SHORT):
            f.refuse(f"tensor '{name}'", "is a RoPE setting pllm does not read")
    scaling_type = f.rope("scaling.type")
    if scaling_type not in (None, "none", "linear"):
        f.refuse(f"key '{f.rope_key('scaling.type')}' ({scaling_type!r})", "is a RoPE scaling pllm does not build")
    config = copy.deepcopy(config)
    _carrier(f.arch)(f, config)
    return config


def _linear_factor(f: _File) -> float | None:
    """The file's linear scaling factor, or None."""
    if f.rope("scaling.type") == "linear":
        factor = f.rope("scaling.factor")
        if factor is None:
            f.refuse(f"key '{f.rope_key('scaling.type')}'", f"is linear but '{f.rope_key('scaling.factor')}' is absent")
        return _positive(f, "scaling.factor", factor)
    legacy = f.rope("scale_linear")
    return None if legacy is None or legacy == 1.0 else _positive(f, "scale_linear", legacy)


def _positive(f: _File, suffix: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        f.refuse(f"key '{f.rope_key(suffix)}'", f"is {value!r}, not a finite positive number")
    return float(value)


def _no_attention_factor(f: _File) -> None:
    factor = f.rope("scaling.attn_factor")
    if factor is not None and factor != 1.0:
        f.refuse(f"key '{f.rope_key('scaling.attn_factor')}' ({factor!r})", "scales attention outside longrope")


def _refuse_tensors(f: _File, *names: str) -> None:
    for name in names:
        if f.tensor(name) is not None:
            f.refuse(f"tensor '{name}'", f"is a RoPE setting pllm does not read for architecture {f.arch!r}")


def _head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _block_key(config: dict) -> str:
    """The RoPE block transformers 5 reads (models/config.py's rope_block)."""
    return "rope_scaling" if config.get("rope_scaling") else "rope_parameters"


def _carry_flat(f: _File, config: dict) -> None:
    """One RoPE for every layer (llama, mistral, qwen2, qwen3, ...): linear or llama3 scaling."""
    _refuse_tensors(f, FACTORS_LONG, FACTORS_SHORT)
    _no_attention_factor(f)
    dims = f.rope("dimension_count")
    if dims is not None and dims != _head_dim(config):
        f.refuse(f"key '{f.rope_key('dimension_count')}' ({dims})", f"rotates part of head_dim {_head_dim(config)}")
    key = _block_key(config)
    block = dict(config.get(key) or {})
    linear, freqs = _linear_factor(f), f.tensor(ROPE_FREQS)
    if linear is not None and freqs is not None:
        f.refuse(f"tensor '{ROPE_FREQS}'", f"and key '{f.rope_key('scaling.type')}' both scale RoPE")
    if linear is not None:
        block.update(rope_type="linear", factor=linear)
    elif freqs is not None:
        theta = float(f.rope("freq_base") or block.get("rope_theta") or config.get("rope_theta") or 10000.0)
        params = _llama3_parameters(f, freqs, theta, _head_dim(config))
        block.update(params)
        if "original_max_position_embeddings" in config:  # the one rope_freqs was made with, which llama.cpp runs
            config["original_max_position_embeddings"] = params["original_max_position_embeddings"]
    config[key] = block


def _carry_gemma3(f: _File, config: dict) -> None:
    """Gemma 3: linear scaling on the global layers only, and the local layers' own theta."""
    _refuse_tensors(f, ROPE_FREQS, FACTORS_LONG, FACTORS_SHORT)
    _no_attention_factor(f)
    dims = f.rope("dimension_count")
    if dims is not None and dims != _head_dim(config):
        f.refuse(f"key '{f.rope_key('dimension_count')}' ({dims})", f"rotates part of head_dim {_head_dim(config)}")
    params = copy.deepcopy(config.get("rope_parameters") or {})
    full = params.setdefault("full_attention", {"rope_type": "default"})
    local = params.setdefault("sliding_attention", {"rope_type": "default"})
    linear = _linear_factor(f)
    if linear is not None:
        full.update(rope_type="linear", factor=linear)
    local_theta = f.rope("freq_base_swa")
    if local_theta is not None:
        local["rope_theta"] = _positive(f, "freq_base_swa", local_theta)
    config["rope_parameters"] = params


def _carry_phi3(f: _File, config: dict) -> None:
    """Phi-3 / Phi-4-mini: partial rotary and longrope (phi3 builds no linear or llama3 scaling)."""
    _refuse_tensors(f, ROPE_FREQS)
    if _linear_factor(f) is not None:
        f.refuse(f"key '{f.rope_key('scaling.type')}'", "is linear, which phi3 does not build")
    key = _block_key(config)
    block = dict(config.get(key) or {})
    head_dim = _head_dim(config)
    dims = f.rope("dimension_count")
    if dims is not None:
        factor = dims / head_dim
        if not 0 < dims <= head_dim or int(head_dim * factor) != dims:
            f.refuse(f"key '{f.rope_key('dimension_count')}' ({dims})", f"is no rotary part of head_dim {head_dim}")
        block["partial_rotary_factor"] = factor
        if config.get("partial_rotary_factor") is not None:
            config["partial_rotary_factor"] = factor
    original = f.rope("scaling.original_context_length")
    if original is not None:
        config["original_max_position_embeddings"] = int(original)
    long, short = f.tensor(FACTORS_LONG), f.tensor(FACTORS_SHORT)
    if long is None and short is None:
        _no_attention_factor(f)
    else:
        block.update(_longrope_parameters(f, config, long, short, original))
    config[key] = block


def _longrope_parameters(f: _File, config: dict, long: np.ndarray | None, short: np.ndarray | None,
                         original: Any) -> dict:
    if long is None or short is None:
        f.refuse(f"tensor '{FACTORS_SHORT if short is None else FACTORS_LONG}'", "is absent beside its pair")
    if original is None:
        f.refuse(f"tensors '{FACTORS_LONG}' / '{FACTORS_SHORT}'",
                 f"come without key '{f.rope_key('scaling.original_context_length')}'")
    original = int(original)
    # transformers' _compute_longrope_parameters' attention factor, as llama.cpp's converter writes it (float32)
    scale = config["max_position_embeddings"] / original
    derived = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
    stored = f.rope("scaling.attn_factor")
    if stored is not None and np.float32(stored) != np.float32(derived):
        f.refuse(f"key '{f.rope_key('scaling.attn_factor')}' ({stored!r})",
                 f"is not longrope's {derived!r} for context {config['max_position_embeddings']} of {original}")
    return {"rope_type": "longrope", "long_factor": [float(x) for x in long],
            "short_factor": [float(x) for x in short], "original_max_position_embeddings": original}


def llama3_factors(theta: float, dim: int, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for these llama3 parameters (LlamaModel's
    generate_extra_tensors, its float32 arithmetic elementwise)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    low_wavelen, high_wavelen = original / low, original / high
    out = torch.where(wavelen < high_wavelen, torch.ones_like(mid),
                      torch.where(wavelen > low_wavelen, torch.full_like(mid, factor), mid))
    return out.numpy()


def _llama3_parameters(f: _File, freqs: np.ndarray, theta: float, head_dim: int) -> dict:
    """The llama3 parameters whose rope_freqs tensor is exactly the file's, else refused."""
    if freqs.shape != (head_dim // 2,):
        f.refuse(f"tensor '{ROPE_FREQS}'", f"has {freqs.shape[0]} factors, not head_dim {head_dim} / 2")
    original_key = f.rope("scaling.original_context_length")
    originals = dict.fromkeys([*([int(original_key)] if original_key else []), *LLAMA3_ORIGINALS])
    factors = dict.fromkeys([float(freqs.max()), *LLAMA3_FACTORS])
    for original in originals:
        for factor in factors:
            for low, high in LLAMA3_LOW_HIGH:
                made = llama3_factors(theta, head_dim, factor, low, high, original)
                if np.array_equal(made.view(np.uint32), freqs.view(np.uint32)):  # bit for bit
                    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": original}
    f.refuse(f"tensor '{ROPE_FREQS}'", "matches no llama3 scaling (factor 8 or 32, low 1, high 4, original length "
             "8192 or the file's): its parameters are not recoverable")


def _carrier(arch_name: str) -> Callable[[_File, dict], None]:
    """The architectures whose RoPE is not one block for every layer have their own; others: _carry_flat."""
    from gguf import MODEL_ARCH, MODEL_ARCH_NAMES

    arch = {name: a for a, name in MODEL_ARCH_NAMES.items()}.get(arch_name)
    return {MODEL_ARCH.GEMMA3: _carry_gemma3, MODEL_ARCH.PHI3: _carry_phi3}.get(arch, _carry_flat)
