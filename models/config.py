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


# Keys whose null transformers' config classes read as "not given" although pllm's default for them is a value:
# LlamaConfig, Qwen2Config and Qwen3Config derive num_key_value_heads from num_attention_heads when it is None, and
# every config class takes `rope_parameters: null` for no block. Any other null with a non-None default is refused.
NULL_MEANS_DEFAULT = frozenset({"num_key_value_heads", "rope_parameters"})


def get_value(config: dict, key: str, kind: type | tuple[type, ...], source: str, default: Any = ...) -> Any:
    """config[key] checked to be of `kind`. Absent gives `default`, and with no default is an error. Null is what
    config.json writes for an optional key that is off: it gives None when `default` is None (and `default` for the
    keys in NULL_MEANS_DEFAULT); any other null is refused by name, as transformers' typed config fields refuse it,
    rather than replaced by a default transformers would not use."""
    if key not in config:
        if default is ...:
            raise ConfigError(f"{source}: missing required key '{key}'")
        return default
    value = config[key]
    if value is None:
        if default is None or (default is not ... and key in NULL_MEANS_DEFAULT):
            return default
        if default is ...:
            raise ConfigError(f"{source}: missing required key '{key}' (it is null)")
        raise ConfigError(f"{source}: key '{key}' is null; it needs {_kind_name(kind)} (transformers' typed config "
                          "field refuses a null): give a value or leave the key out")
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


# RoPE keys whose top-level null transformers' convert_rope_params_to_dict skips (`if partial_rotary_factor is not
# None`); a null rope_theta it copies into the block, and the model then fails to build.
ROPE_NULL_IS_UNSET = frozenset({"partial_rotary_factor"})


def rope_block(config: dict) -> Any:
    """The RoPE block transformers 5 reads: `rope_scaling` when it is given (not null or empty), else
    `rope_parameters`. transformers drops `rope_parameters` whole when `rope_scaling` is given
    (convert_rope_params_to_dict: `rope_parameters = rope_scaling or rope_parameters`), theta included."""
    return config.get("rope_scaling") or config.get("rope_parameters")


def rope_parameter(config: dict, key: str, read: Callable[[dict, str, str, Any], Any], source: str,
                   default: Any) -> Any:
    """A RoPE key a config may give twice: at the top level (the older configs' `rope_theta`, `partial_rotary_factor`)
    and inside the block transformers 5 reads (rope_block()). transformers reads the block's copy and ignores the
    top-level one, so the two disagreeing is a config that says two things; refused, naming both, rather than one
    picked in silence. Neither given: `default`, transformers' class default."""
    params = rope_block(config)
    block = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    top = read(config, key, source, None)
    inner = read(params, key, f"{source}: {block}", None) if isinstance(params, dict) else None
    if top is not None and inner is not None and top != inner:
        raise ConfigError(f"{source}: key '{key}' is {top!r} but key '{block}.{key}' is {inner!r}; they "
                          f"contradict (transformers 5 reads {block}): remove one or make them agree")
    if inner is None and top is None and key in config and key not in ROPE_NULL_IS_UNSET:
        raise ConfigError(f"{source}: key '{key}' is null and '{block}' gives none; transformers would build its "
                          f"RoPE from the null: give a value or leave the key out")
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
    # transformers 5 writes `rope_parameters` (theta and scaling together); older configs `rope_scaling`. The legacy
    # `type` spelling is the type when `rope_type` is absent, as transformers' standardize_rope_params reads it.
    rs = rope_block(config)
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
