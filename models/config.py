"""Shared config.json validation: the typed key readers every family's config rules are built from."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pllm.models.spec import RopeScaling

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# No released model exceeds ~10M positions; anything above this bound is a typo or an attack, and the runtime sizes
# tables by it.
MAX_POSITION_EMBEDDINGS = 2**27


class ConfigError(ValueError):
    """A model's config.json says something pllm cannot build; the message names the key, value and file."""


def get_value(config: dict, key: str, kind: type | tuple[type, ...], source: str, default: Any = ...) -> Any:
    """config[key] checked to be of `kind`; absent or null gives `default`, and with no default is an error."""
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


def positive(config: dict, key: str, source: str, default: Any = ...) -> int | None:
    value = get_value(config, key, int, source, default)
    if value is None:
        return None
    if value <= 0:
        raise ConfigError(f"{source}: key '{key}' must be a positive integer, got {value!r}")
    return value


def finite_positive(config: dict, key: str, source: str, default: Any = ...) -> float | None:
    value = get_value(config, key, (int, float), source, default)
    if value is None:
        return None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{source}: key '{key}' must be a finite positive number, got {value!r}")
    return float(value)


def rope_parameter(config: dict, key: str, read: Callable[[dict, str, str, Any], Any], source: str,
                   default: Any) -> Any:
    """A RoPE key a config may give twice: at the top level (the older configs' `rope_theta`, `partial_rotary_factor`)
    and inside transformers 5's `rope_parameters`. transformers 5 reads the block and ignores the top-level copy, so
    the two disagreeing is a config that says two things; refused, naming both, rather than one picked in silence."""
    params = config.get("rope_parameters")
    top = read(config, key, source, None)
    inner = read(params, key, f"{source}: rope_parameters", None) if isinstance(params, dict) else None
    if top is not None and inner is not None and top != inner:
        raise ConfigError(f"{source}: key '{key}' is {top!r} but key 'rope_parameters.{key}' is {inner!r}; they "
                          "contradict (transformers 5 reads rope_parameters): remove one or make them agree")
    for value in (inner, top):
        if value is not None:
            return value
    return default


def token_id(value: Any, key: str, vocab_size: int, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ConfigError(
            f"{source}: key '{key}' must be a token id in [0, vocab_size={vocab_size}), got {value!r}"
        )
    return value


def eos_token_ids(config: dict, vocab_size: int, source: str) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    if isinstance(eos, list):
        return tuple(token_id(e, "eos_token_id", vocab_size, source) for e in eos)
    return (token_id(eos, "eos_token_id", vocab_size, source),)


def rope_scaling(config: dict, source: str) -> RopeScaling | None:
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
    factor = finite_positive(rs, "factor", f"{source}: rope_scaling")
    if rope_type == "linear":
        return RopeScaling("linear", factor)
    where = f"{source}: llama3 rope_scaling"
    low = finite_positive(rs, "low_freq_factor", where)
    high = finite_positive(rs, "high_freq_factor", where)
    if high <= low:
        # the llama3 rule divides by (high - low)
        raise ConfigError(f"{where}: high_freq_factor ({high}) must be greater than low_freq_factor ({low})")
    return RopeScaling("llama3", factor, low, high, positive(rs, "original_max_position_embeddings", where))
