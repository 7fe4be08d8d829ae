"""Which layers of a llama-wired model attend through a sliding window, as transformers decides per family."""

from __future__ import annotations

from enum import Enum

from pllm.models.config import ConfigError, get_value, positive


class WindowRule(Enum):
    """How a family's config.json turns on a sliding window, and on which layers (transformers 5's rules)."""

    NONE = "none"  # no window at all: a `sliding_window` key is not read (llama)
    EVERY_LAYER = "every_layer"  # `sliding_window` set windows every layer (mistral, mixtral, phi3)
    SWITCHED_EVERY_LAYER = "switched_every_layer"  # only with `use_sliding_window` true, then every layer (qwen3_moe)
    # only with `use_sliding_window` true, then the layers `layer_types` marks sliding_attention, or without it
    # those from `max_window_layers` on (qwen2, qwen3)
    SWITCHED_BY_LAYER_TYPE = "switched_by_layer_type"


def sliding_layers(config: dict, source: str, rule: WindowRule, num_layers: int,
                   max_positions: int) -> tuple[int | None, tuple[int, ...]]:
    """(the window, the windowed layers), or (None, ()) when no layer's attention is limited: a window at least
    max_position_embeddings long limits nothing."""
    if rule is WindowRule.NONE:
        return None, ()
    window = positive(config, "sliding_window", source, None)
    if rule in (WindowRule.SWITCHED_EVERY_LAYER, WindowRule.SWITCHED_BY_LAYER_TYPE):
        if not get_value(config, "use_sliding_window", bool, source, False):
            return None, ()
    elif config.get("layer_types") is not None:
        # transformers' mistral, mixtral and phi3 window every layer and only warn about layer_types (alternating
        # attention is Ministral's); which layers the checkpoint was trained with is then unclear
        raise ConfigError(f"{source}: key 'layer_types' is not read for this model type (transformers windows every "
                          "layer by `sliding_window` alone); remove it, or use a model type that alternates layers")
    if window is None or window >= max_positions:
        return None, ()
    if rule is WindowRule.SWITCHED_BY_LAYER_TYPE:
        layers = _layers_by_type(config, source, num_layers)
    else:
        layers = tuple(range(num_layers))
    return (window, layers) if layers else (None, ())


def _layers_by_type(config: dict, source: str, num_layers: int) -> tuple[int, ...]:
    """`layer_types`' sliding_attention entries when the config lists them, else every layer from
    `max_window_layers` (default 28) on."""
    layer_types = get_value(config, "layer_types", list, source, None)
    if layer_types is None:
        first = get_value(config, "max_window_layers", int, source, 28)
        if first < 0:
            raise ConfigError(f"{source}: key 'max_window_layers' must be a non-negative integer, got {first!r}")
        return tuple(range(first, num_layers))
    if len(layer_types) != num_layers or not set(layer_types) <= {"full_attention", "sliding_attention"}:
        raise ConfigError(f"{source}: key 'layer_types' must list 'full_attention' or 'sliding_attention' for each "
                          f"of the num_hidden_layers={num_layers} layers, got {layer_types!r}")
    return tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
