"""config.json -> ModelSpec, through the family the registry holds for the config's model_type."""

from __future__ import annotations

import json
from pathlib import Path

# ConfigError and the limits are the models' own; re-exported because the CLI and callers know them from here.
from pllm.models.config import MAX_POSITION_EMBEDDINGS, ConfigError
from pllm.models.registry import SUPPORTED_MODEL_TYPES, family_of
from pllm.models.spec import ModelKind, ModelSpec

# transformers' task heads that replace a decoder's LM head (score.weight, classifier, qa_outputs): a checkpoint
# saved from one has no LM head to generate with
NON_GENERATIVE_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")

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
    spec = family_of(config.get("model_type"), source).spec_from_config(config, source)
    architectures = config.get("architectures")
    if spec.kind is ModelKind.DECODER and isinstance(architectures, list) and architectures and all(
            isinstance(a, str) and a.endswith(NON_GENERATIVE_HEADS) for a in architectures):
        raise ConfigError(f"{source}: key 'architectures' is {architectures!r}, a task head in place of the LM head; "
                          "pllm serves causal LMs (*ForCausalLM): compile that checkpoint of the model")
    return spec
