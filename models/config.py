"""Shared config.json validation: the typed key readers every family's config rules are built from."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pllm.models.spec import RopeScaling

# "dynamic" (dynamic NTK) is not here: transformers rescales RoPE's base by each forward's longest position and keeps
# the K/V rotated before, vLLM one fixed base for max_position_embeddings * factor: no position-only table gives both.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# The keys transformers' _validate_yarn_rope_parameters knows; it warns on any other and runs without it.
# partial_rotary_factor is left out: the llama wiring rotates whole heads, so one would be dropped.
YARN_KEYS = frozenset({"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
                       "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"})
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


def rope_block_name(config: dict) -> str:
    """The key rope_block() read, for messages."""
    return "rope_scaling" if config.get("rope_scaling") else "rope_parameters"


def rope_parameter(config: dict, key: str, read: Callable[[dict, str, str, Any], Any], source: str,
                   default: Any) -> Any:
    """A RoPE key a config may give twice: at the top level (the older configs' `rope_theta`, `partial_rotary_factor`)
    and inside the block transformers 5 reads (rope_block()). transformers reads the block's copy and ignores the
    top-level one, so the two disagreeing is a config that says two things; refused, naming both, rather than one
    picked in silence. Neither given: `default`, transformers' class default."""
    params = rope_block(config)
    block = rope_block_name(config)
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
    if rope_type == "yarn":
        return _yarn(config, rs, source)
    factor = finite_positive(rs, "factor", f"{source}: rope_scaling")
    if rope_type == "linear":
        return RopeScaling("linear", factor)
    where = f"{source}: llama3 rope_scaling"
    low = finite_positive(rs, "low_freq_factor", where)
    high = finite_positive(rs, "high_freq_factor", where)
    if high <= low:
        # the llama3 rule divides by (high - low)
        raise ConfigError(f"{where}: high_freq_factor ({high}) must be greater than low_freq_factor ({low})")
    return RopeScaling("llama3", factor, low, high, original_length(config, rs, source, where))


def _yarn(config: dict, rs: dict, source: str) -> RopeScaling:
    """YaRN, read as transformers 5's _compute_yarn_parameters reads it, its attention factor resolved here."""
    where = f"{source}: yarn rope_scaling"
    unknown = sorted(set(rs) - YARN_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} (transformers' yarn reads only "
                          f"{', '.join(sorted(YARN_KEYS))})")
    if "factor" not in rs:  # transformers raises KeyError; a null factor it derives
        raise ConfigError(f"{where}: missing required key 'factor'")
    original = original_length(config, rs, source, where)
    factor = finite_positive(rs, "factor", where, None)
    if factor is None:  # as transformers: the stretch from the original length to max_position_embeddings
        factor = _max_positions(config, source, where, "factor is null") / original
    if factor < 1:
        raise ConfigError(f"{where}: key 'factor' is {factor!r} (given, or max_position_embeddings / "
                          f"original_max_position_embeddings when null); YaRN stretches the context: it must be >= 1")
    beta_fast = _yarn_beta(rs, "beta_fast", 32.0, where)
    beta_slow = _yarn_beta(rs, "beta_slow", 1.0, where)
    if beta_fast <= beta_slow:
        raise ConfigError(f"{where}: key 'beta_fast' ({beta_fast}) must be greater than key 'beta_slow' ({beta_slow})")
    if rs.get("truncate", True) is None:  # transformers would read a null as false, absent as true
        raise ConfigError(f"{where}: key 'truncate' is null; give true or false, or leave it out (true)")
    truncate = get_value(rs, "truncate", bool, where, True)
    attention_factor = finite_positive(rs, "attention_factor", where, None)
    if attention_factor is None:  # the paper's 0.1 * ln(factor) + 1, or DeepSeek's ratio of two such
        mscale = _non_negative(rs, "mscale", where)
        mscale_all_dim = _non_negative(rs, "mscale_all_dim", where)
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    return RopeScaling("yarn", factor, original_max_position_embeddings=original, attention_factor=attention_factor,
                       beta_fast=beta_fast, beta_slow=beta_slow, truncate=truncate)


def original_length(config: dict, rs: dict, source: str, where: str, class_default: int | None = None) -> int:
    """The pretraining length llama3, yarn and longrope scale from (original_max_position_embeddings), as transformers
    5 reads it: each rotary function runs standardize_rope_params again, which writes the config's top-level value
    over the block's when the config has one (config.json gave it, or the class declares it: `class_default`, as
    Phi3Config's 4096), and else defaults the block's to max_position_embeddings. A block value that differs from
    the one transformers takes is a contradiction, named."""
    key = "original_max_position_embeddings"
    top = positive(config, key, source) if key in config else class_default
    inner = positive(rs, key, where) if key in rs else None
    if top is not None and inner is not None and top != inner:
        given = f"is {top!r}" if key in config else f"is not given (transformers takes its class default {top!r})"
        raise ConfigError(f"{source}: key '{key}' {given} but key '{rope_block_name(config)}.{key}' is {inner!r}; "
                          "they contradict (transformers 5 takes the top-level one): remove one or make them agree")
    for value in (top, inner):
        if value is not None:
            return value
    return _max_positions(config, source, where, f"'{key}' is not given")


def _max_positions(config: dict, source: str, where: str, why: str) -> int:
    # transformers would take its config class's default; pllm's families do not all share one, so it is asked for
    if "max_position_embeddings" not in config:
        raise ConfigError(f"{where}: {why}, and transformers then reads key 'max_position_embeddings', which is "
                          "not given: give either")
    return positive(config, "max_position_embeddings", source)


def _yarn_beta(rs: dict, key: str, default: float, where: str) -> float:
    # transformers reads `rs.get(key) or default`: null and 0 both give the paper's default
    value = get_value(rs, key, (int, float), where, None)
    if not value:
        return default
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}: key '{key}' must be a finite positive number, got {value!r}")
    return float(value)


def _non_negative(rs: dict, key: str, where: str) -> float | None:
    value = get_value(rs, key, (int, float), where, None)
    if value is not None and (not math.isfinite(value) or value < 0):
        raise ConfigError(f"{where}: key '{key}' must be a finite number >= 0, got {value!r}")
    return value


def _yarn_mscale(scale: float, mscale: float = 1) -> float:
    # transformers' yarn_get_mscale, term for term (the table must equal its cos and sin bit for bit)
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
