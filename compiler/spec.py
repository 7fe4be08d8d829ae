"""config.json -> ModelSpec: the model's shape under Hugging Face's names, validated, with derived fields."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pllm.models.spec import DTYPES, ModelSpec, RopeScaling

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# No released model exceeds ~10M positions; anything above this bound is a typo or an attack, and the runtime sizes
# tables by it.
MAX_POSITION_EMBEDDINGS = 2**27


class ConfigError(ValueError):
    """A model's config.json says something pllm cannot build; the message names the key, value and file."""


def load_spec(config_path: str | Path) -> ModelSpec:
    path = Path(config_path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return spec_from_config(config, str(path))


def _get(config: dict, key: str, kind: type | tuple[type, ...], source: str, default: Any = ...) -> Any:
    if key not in config or config[key] is None:
        if default is ...:
            raise ConfigError(f"{source}: missing required key '{key}'")
        return default
    value = config[key]
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else ()):
        raise ConfigError(f"{source}: key '{key}' must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{source}: key '{key}' must be {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _positive(config: dict, key: str, source: str, default: Any = ...) -> int | None:
    value = _get(config, key, int, source, default)
    if value is None:
        return None
    if value <= 0:
        raise ConfigError(f"{source}: key '{key}' must be a positive integer, got {value!r}")
    return value


def _finite_positive(config: dict, key: str, source: str, default: Any = ...) -> float | None:
    value = _get(config, key, (int, float), source, default)
    if value is None:
        return None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{source}: key '{key}' must be a finite positive number, got {value!r}")
    return float(value)


def _token_id(value: Any, key: str, vocab_size: int, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ConfigError(
            f"{source}: key '{key}' must be a token id in [0, vocab_size={vocab_size}), got {value!r}"
        )
    return value


def _eos_token_ids(config: dict, vocab_size: int, source: str) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    if isinstance(eos, list):
        return tuple(_token_id(e, "eos_token_id", vocab_size, source) for e in eos)
    return (_token_id(eos, "eos_token_id", vocab_size, source),)


def _rope_scaling(config: dict, source: str) -> RopeScaling | None:
    # transformers 5 writes `rope_parameters` (theta and scaling together); older configs `rope_scaling`.
    rs = config.get("rope_scaling") or config.get("rope_parameters")
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ConfigError(f"{source}: key 'rope_scaling' must be an object or null, got {rs!r}")
    rope_type = rs.get("rope_type", rs.get("type"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope_scaling type {rope_type!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return None
    factor = _finite_positive(rs, "factor", f"{source}: rope_scaling")
    if rope_type == "linear":
        return RopeScaling("linear", factor)
    where = f"{source}: llama3 rope_scaling"
    low = _finite_positive(rs, "low_freq_factor", where)
    high = _finite_positive(rs, "high_freq_factor", where)
    if high <= low:
        # the llama3 rule divides by (high - low)
        raise ConfigError(f"{where}: high_freq_factor ({high}) must be greater than low_freq_factor ({low})")
    return RopeScaling("llama3", factor, low, high, _positive(rs, "original_max_position_embeddings", where))


def spec_from_config(config: dict, source: str = "config.json") -> ModelSpec:
    """Validate a Hugging Face config dict and derive the ModelSpec; errors name the key and the file."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: must be a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    hidden = _positive(config, "hidden_size", source)
    num_heads = _positive(config, "num_attention_heads", source)
    num_kv = _positive(config, "num_key_value_heads", source, num_heads)
    if num_heads % num_kv:
        raise ConfigError(
            f"{source}: num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv})"
        )
    head_dim = config.get("head_dim")
    if head_dim is None:
        if hidden % num_heads:
            raise ConfigError(
                f"{source}: hidden_size ({hidden}) is not divisible by num_attention_heads ({num_heads}) "
                "and no head_dim is given"
            )
        head_dim = hidden // num_heads
    else:
        head_dim = _positive(config, "head_dim", source)
    if head_dim % 2:
        raise ConfigError(f"{source}: head_dim ({head_dim}) must be even for rotary embeddings")

    # Sliding-window attention: read, and refused when it would actually change the output.
    max_pos = _positive(config, "max_position_embeddings", source, 2048)
    if max_pos > MAX_POSITION_EMBEDDINGS:
        raise ConfigError(
            f"{source}: key 'max_position_embeddings' is {max_pos}; pllm supports at most {MAX_POSITION_EMBEDDINGS}"
        )
    window = _positive(config, "sliding_window", source, None)
    uses_window = _get(config, "use_sliding_window", bool, source, model_type == "mistral")
    if window is not None and uses_window and window < max_pos:
        raise ConfigError(
            f"{source}: sliding_window={window} (< max_position_embeddings={max_pos}) is not supported by the "
            "runtime; pllm attends to the full context and would give different results"
        )

    dtype = config.get("torch_dtype", config.get("dtype", "float32")) or "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"{source}: key 'torch_dtype' is {dtype!r}; supported: {', '.join(DTYPES)}")

    vocab_size = _positive(config, "vocab_size", source)
    eos_ids = _eos_token_ids(config, vocab_size, source)
    bos = config.get("bos_token_id")
    bos_id = None if bos is None else _token_id(bos, "bos_token_id", vocab_size, source)
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
    if _get(config, "mlp_bias", bool, source, False):
        raise ConfigError(f"{source}: mlp_bias=true is not supported")

    rope_parameters = _get(config, "rope_parameters", dict, source, {})
    theta = _finite_positive(config, "rope_theta", source, None)
    if theta is None:
        theta = _finite_positive(rope_parameters, "rope_theta", f"{source}: rope_parameters", 10000.0)
    eps = _finite_positive(config, "rms_norm_eps", source, 1e-6)
    return ModelSpec(
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=_positive(config, "intermediate_size", source),
        num_hidden_layers=_positive(config, "num_hidden_layers", source),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv,
        head_dim=head_dim,
        vocab_size=vocab_size,
        rms_norm_eps=eps,
        rope_theta=theta,
        rope_scaling=_rope_scaling(config, source),
        max_position_embeddings=max_pos,
        tie_word_embeddings=_get(config, "tie_word_embeddings", bool, source, False),
        attention_bias=model_type == "qwen2" or _get(config, "attention_bias", bool, source, False),
        torch_dtype=dtype,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
    )
