"""The model registry: every model_type resolves to a family whose layout, model and checkpoint names agree."""

from dataclasses import fields

import pytest
import torch

from pllm.models.config import ConfigError
from pllm.models.registry import FAMILIES, SUPPORTED_MODEL_TYPES, family_of
from pllm.models.spec import ModelKind
from pllm.runtime.backends.cpu.cpu_ops import TorchOps

CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 256,
}
# keys a family requires beyond CONFIG
FAMILY_KEYS = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "mlp_only_layers": [0]},
}


def config_of(model_type: str, **extra) -> dict:
    """CONFIG as `model_type`'s config.json holds it (gemma3: the text model's keys in text_config)."""
    if model_type == "gemma3":
        return {"model_type": model_type, "text_config": {**CONFIG, **extra}}
    return {**CONFIG, **FAMILY_KEYS.get(model_type, {}), "model_type": model_type, **extra}


# encoders have no final norm or LM head: tests/models/test_bert.py checks their layout
DECODER_TYPES = [t for t in SUPPORTED_MODEL_TYPES
                 if FAMILIES[t].spec_from_config(config_of(t), "cfg.json").kind is ModelKind.DECODER]


def test_families_are_keyed_by_their_model_type():
    assert SUPPORTED_MODEL_TYPES == (
        "llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen3_moe", "gemma3_text", "gemma3", "bert"
    )
    assert all(family.model_type == key for key, family in FAMILIES.items())


@pytest.mark.parametrize("model_type", [None, "gpt2", ["llama"]])
def test_unknown_model_type_names_the_value_and_file(model_type):
    with pytest.raises(ConfigError, match=r"cfg\.json: model_type .* is not supported \(supported: llama, mistral"):
        family_of(model_type, "cfg.json")


@pytest.mark.parametrize("model_type", DECODER_TYPES)
@pytest.mark.parametrize("tied", [False, True])
def test_every_layout_tensor_reaches_the_model_once(model_type, tied):
    family = family_of(model_type, "cfg.json")
    spec = family.spec_from_config(config_of(model_type, tie_word_embeddings=tied), "cfg.json")
    layout = family.weight_layout(spec)
    weights = {name: torch.zeros(entry.shape) for name, entry in layout.items()}
    model = family.model(spec, weights, TorchOps(), 16)  # plain PyTorch ops: no compiled decode step to bind
    per_layer = [getattr(layer, f.name) for layer in model.layers for f in fields(layer)]
    used = [t for t in per_layer if isinstance(t, torch.Tensor)] + [weights["embed_tokens"], weights["norm"]]
    used += [] if tied else [weights["lm_head"]]
    assert sorted(id(t) for t in used) == sorted(id(t) for t in weights.values())
    assert all((getattr(layer, "qkv_bias", None) is not None) == spec.attention_bias for layer in model.layers)
    assert model.cos_sin.shape == (16, spec.head_dim)


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_checkpoint_names_the_build_checks_agree_with_the_layout(model_type):
    family = family_of(model_type, "cfg.json")
    spec = family.spec_from_config(config_of(model_type), "cfg.json")
    layout = family.weight_layout(spec)
    assert layout["embed_tokens"].hf_names == (family.hf_embedding,)
    for name, entry in layout.items():
        index = int(name.split(".")[1]) if name.startswith("layers.") else None
        for hf_name in entry.hf_names:
            match = family.hf_layer_pattern.match(hf_name)
            assert (int(match[1]) if match else None) == index, hf_name
