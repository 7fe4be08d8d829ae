"""config.json -> ModelSpec, through the family the registry holds for the config's model_type."""

from __future__ import annotations

import json
from pathlib import Path

# ConfigError and the limits are the models' own; re-exported because the CLI and callers know them from here.
from pllm.models.config import MAX_POSITION_EMBEDDINGS, ConfigError
from pllm.models.registry import SUPPORTED_MODEL_TYPES, family_of
from pllm.models.spec import ModelSpec

__all__ = ["MAX_POSITION_EMBEDDINGS", "SUPPORTED_MODEL_TYPES", "ConfigError", "load_spec", "spec_from_config"]


def load_spec(config_path: str | Path) -> ModelSpec:
    path = Path(config_path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return spec_from_config(config, str(path))


def spec_from_config(config: dict, source: str = "config.json") -> ModelSpec:
    """Validate a Hugging Face config dict and derive the ModelSpec; errors name the key and the file."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: must be a JSON object, got {type(config).__name__}")
    return family_of(config.get("model_type"), source).spec_from_config(config, source)
