"""original_max_position_embeddings, read as transformers 5 reads it for llama3, yarn and longrope: the top-level key
over the rope block's (Phi3Config's class default when config.json gives none), else max_position_embeddings; the
cos/sin table equals transformers' rotary embedding's, and a block value transformers would overwrite is refused."""

import json

import pytest
import torch
import transformers

from pllm.compiler.spec import load_spec
from pllm.models.config import ConfigError
from pllm.models.rotary import rope_cos_sin

KEY = "original_max_position_embeddings"
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0]}
LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 32,
         "max_position_embeddings": 256, "rope_theta": 10000.0}
# head_dim 16, rotary on 8 dims; max_position_embeddings past Phi3Config's default original length (4096)
PHI3 = {**{k: v for k, v in LLAMA.items() if k != "head_dim"}, "model_type": "phi3", "partial_rotary_factor": 0.5,
        "max_position_embeddings": 8192, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# (base config, overrides, the original length transformers' table uses)
LLAMA_CASES = {
    "llama3-top-level-only": (LLAMA, {"rope_scaling": LLAMA3, KEY: 32}, 32),
    "llama3-both-agree": (LLAMA, {"rope_scaling": {**LLAMA3, KEY: 32}, KEY: 32}, 32),
    "llama3-block-only": (LLAMA, {"rope_scaling": {**LLAMA3, KEY: 32}}, 32),
    "llama3-neither-is-max-positions": (LLAMA, {"rope_scaling": LLAMA3}, 256),
    "llama3-rope-parameters-top-level": (LLAMA, {"rope_parameters": {**LLAMA3, "rope_theta": 1e4}, KEY: 32}, 32),
    "yarn-top-level-only": (LLAMA, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, KEY: 32}, 32),
}
PHI3_CASES = {
    "longrope-top-level-only": (PHI3, {"rope_scaling": LONGROPE, KEY: 64}, 64),
    "longrope-both-agree": (PHI3, {"rope_scaling": {**LONGROPE, KEY: 64}, KEY: 64}, 64),
    "longrope-neither-is-class-default": (PHI3, {"rope_scaling": LONGROPE}, 4096),
    "longrope-block-equals-class-default": (PHI3, {"rope_scaling": {**LONGROPE, KEY: 4096}}, 4096),
}


def load_both(tmp_path, base: dict, overrides: dict):
    config = {**base, **overrides}
    if "rope_parameters" in overrides:
        del config["rope_theta"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf_config = transformers.AutoConfig.from_pretrained(str(tmp_path))
    rotary = transformers.AutoModelForCausalLM.from_config(hf_config).model.rotary_emb
    return load_spec(tmp_path / "config.json"), rotary


def hf_table(rotary, num_positions: int, half: int) -> torch.Tensor:
    """transformers' cos and sin for positions [0, num_positions), as pllm lays them out: cos half, then sin half."""
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(num_positions)[None])
    return torch.cat([cos[0, :, :half], sin[0, :, :half]], dim=1)


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_original_length_and_table_equal_transformers(tmp_path, case):
    base, overrides, original = LLAMA_CASES[case]
    spec, rotary = load_both(tmp_path, base, overrides)
    assert rotary.config.rope_parameters[KEY] == original  # what transformers' own rotary function wrote and read
    assert spec.rope_scaling.original_max_position_embeddings == original
    num_positions = 300  # past every original length and max_position_embeddings
    assert torch.equal(rope_cos_sin(spec, num_positions), hf_table(rotary, num_positions, spec.rotary_dim // 2))


def test_linear_ignores_a_top_level_original_length(tmp_path):
    """transformers' linear rule reads only the factor: the key changes nothing, in either."""
    spec, rotary = load_both(tmp_path, LLAMA, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, KEY: 32})
    assert spec.rope_scaling.rope_type == "linear"
    assert torch.equal(rope_cos_sin(spec, 300), hf_table(rotary, 300, spec.rotary_dim // 2))


@pytest.mark.parametrize("case", PHI3_CASES)
def test_phi3_longrope_original_length_equals_transformers(tmp_path, case):
    """Short factors up to the original length, long ones past it (transformers picks per forward), the attention
    factor (which the original length sets) folded into both."""
    base, overrides, original = PHI3_CASES[case]
    spec, rotary = load_both(tmp_path, base, overrides)
    assert spec.rope_scaling.original_max_position_embeddings == original
    assert spec.rope_scaling.attention_factor == rotary.attention_scaling
    half = spec.rotary_dim // 2
    table = rope_cos_sin(spec, original + 1)  # short-factor rows, then long-factor rows
    assert torch.equal(table[:original], hf_table(rotary, original, half))
    assert torch.equal(table[original + 1:], hf_table(rotary, original + 1, half))


@pytest.mark.parametrize("base, overrides, top, block, words", [
    (LLAMA, {"rope_scaling": {**LLAMA3, KEY: 64}, KEY: 32}, "32", "64", ["rope_scaling." + KEY]),
    (LLAMA, {"rope_parameters": {**LLAMA3, "rope_theta": 1e4, KEY: 64}, KEY: 32}, "32", "64",
     ["rope_parameters." + KEY]),
    (LLAMA, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, KEY: 64}, KEY: 32}, "32", "64",
     ["rope_scaling." + KEY]),
    (PHI3, {"rope_scaling": {**LONGROPE, KEY: 64}, KEY: 32}, "32", "64", ["rope_scaling." + KEY]),
    # transformers writes Phi3Config's 4096 over the block's 64: the block is not what would run
    (PHI3, {"rope_scaling": {**LONGROPE, KEY: 64}}, "4096", "64", ["not given", "class default"]),
], ids=["llama3", "llama3-rope-parameters", "yarn", "phi3-longrope", "phi3-longrope-block-only"])
def test_top_level_and_block_that_differ_are_refused_naming_both(tmp_path, base, overrides, top, block, words):
    config = {**base, **overrides}
    if "rope_parameters" in overrides:
        del config["rope_theta"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as e:
        load_spec(tmp_path / "config.json")
    message = str(e.value)
    for word in [f"'{KEY}'", top, block, "contradict", "config.json", *words]:
        assert word in message, (word, message)
