"""The model registry: each supported config.json `model_type` -> its ModelFamily."""

from __future__ import annotations

from pllm.models.bert import BERT
from pllm.models.config import ConfigError
from pllm.models.family import ModelFamily
from pllm.models.gemma3 import GEMMA3, GEMMA3_TEXT
from pllm.models.llama import LLAMA
from pllm.models.mistral import MISTRAL
from pllm.models.mixtral import MIXTRAL
from pllm.models.phi3 import PHI3
from pllm.models.qwen2 import QWEN2
from pllm.models.qwen3 import QWEN3
from pllm.models.qwen3_moe import QWEN3_MOE

# One line per family; a new family is a module in models/ and a line here.
FAMILIES: dict[str, ModelFamily] = {family.model_type: family for family in (
    LLAMA,
    MISTRAL,
    QWEN2,
    QWEN3,
    PHI3,
    MIXTRAL,
    QWEN3_MOE,
    GEMMA3_TEXT,
    GEMMA3,
    BERT,  # an encoder: embeddings only
)}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family_of(model_type: object, source: str) -> ModelFamily:
    """The family registered for `model_type`; `source` names the config file in the error."""
    if model_type not in SUPPORTED_MODEL_TYPES:  # a tuple: JSON may give an unhashable list here
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return FAMILIES[model_type]
