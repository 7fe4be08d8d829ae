"""YaRN rope_scaling read from config.json as transformers 5 reads it; bad values refused by name; the spec's new
fields round-trip through the manifest, and a manifest written before them still loads."""

import json
import math
from pathlib import Path

import pytest

from pllm.compiler.manifest_check import spec_from_manifest
from pllm.compiler.spec import ConfigError, spec_from_config
from pllm.models.spec import RopeScaling

from .test_spec import BASE as SPEC_BASE

BASE = {**SPEC_BASE, "model_type": "qwen2", "eos_token_id": 2}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


def read(rope_scaling: dict, **top) -> RopeScaling:
    return spec_from_config({**BASE, "rope_scaling": rope_scaling, **top}, "cfg.json").rope_scaling


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe"])
def test_every_llama_wired_family_reads_qwen_long_context_yarn(model_type):
    extra = {"num_local_experts": 2, "num_experts_per_tok": 1} if model_type == "mixtral" else {}
    if model_type == "qwen3_moe":
        extra = {"num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 16}
    spec = spec_from_config({**BASE, **extra, "model_type": model_type, "rope_scaling": {**YARN, "type": "yarn"}})
    assert spec.rope_scaling == RopeScaling("yarn", 4.0, original_max_position_embeddings=32,
                                            attention_factor=0.1 * math.log(4.0) + 1.0)


def test_defaults_are_transformers():
    rs = read({"type": "yarn", "factor": 2})  # legacy spelling, int factor, no original length
    assert (rs.factor, rs.beta_fast, rs.beta_slow, rs.truncate) == (2.0, 32.0, 1.0, True)
    assert rs.original_max_position_embeddings == 256  # max_position_embeddings, as standardize_rope_params sets
    assert read({**YARN, "beta_fast": 0, "beta_slow": None}).beta_fast == 32.0  # `get(key) or 32`
    assert read({**YARN, "factor": None}).factor == 256 / 32  # derived: max_position_embeddings / original


def test_attention_factor_given_or_from_mscales():
    assert read({**YARN, "attention_factor": 0.5, "mscale": 2.0, "mscale_all_dim": 1.0}).attention_factor == 0.5
    both = read({**YARN, "mscale": 1.0, "mscale_all_dim": 0.5}).attention_factor
    assert both == (0.1 * math.log(4.0) + 1.0) / (0.1 * 0.5 * math.log(4.0) + 1.0)
    assert read({**YARN, "mscale": 1.0, "mscale_all_dim": 0}).attention_factor == 0.1 * math.log(4.0) + 1.0
    assert read({**YARN, "factor": 1.0}).attention_factor == 1.0


def test_top_level_original_length_overrides_as_transformers_does():
    assert read({"rope_type": "yarn", "factor": 4.0}, original_max_position_embeddings=16) \
        .original_max_position_embeddings == 16
    assert read(YARN, original_max_position_embeddings=32).original_max_position_embeddings == 32
    with pytest.raises(ConfigError) as e:
        read(YARN, original_max_position_embeddings=16)
    for word in ("'original_max_position_embeddings'", "'rope_scaling.original_max_position_embeddings'", "16",
                 "32", "cfg.json"):
        assert word in str(e.value)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"factor": 0.5}, ["factor", "0.5"]),
        ({"factor": None, "original_max_position_embeddings": 512}, ["factor", "0.5", "max_position_embeddings"]),
        ({"factor": "4"}, ["factor", "'4'"]),
        ({"factor": float("nan")}, ["factor", "nan"]),
        ({"beta_fast": 1.0}, ["beta_fast", "beta_slow", "1.0"]),
        ({"beta_fast": 4, "beta_slow": 8}, ["beta_fast", "beta_slow", "4.0", "8.0"]),
        ({"beta_slow": -1}, ["beta_slow", "-1"]),
        ({"beta_fast": "32"}, ["beta_fast", "'32'"]),
        ({"beta_fast": float("inf")}, ["beta_fast", "inf"]),
        ({"attention_factor": -0.5}, ["attention_factor", "-0.5"]),
        ({"attention_factor": 0}, ["attention_factor", "0"]),
        ({"mscale": -1.0, "mscale_all_dim": 1.0}, ["mscale", "-1.0"]),
        ({"mscale_all_dim": "1"}, ["mscale_all_dim", "'1'"]),
        ({"truncate": "no"}, ["truncate", "'no'"]),
        ({"truncate": None}, ["truncate", "null"]),
        ({"original_max_position_embeddings": None}, ["original_max_position_embeddings", "null"]),
        ({"original_max_position_embeddings": 0}, ["original_max_position_embeddings", "0"]),
        ({"original_max_position_embeddings": 32.5}, ["original_max_position_embeddings", "32.5"]),
        ({"low_freq_factor": 1.0}, ["unknown", "low_freq_factor"]),
        ({"llama_4_scaling_beta": 0.1}, ["unknown", "llama_4_scaling_beta"]),
        ({"partial_rotary_factor": 0.5}, ["unknown", "partial_rotary_factor"]),
    ],
)
def test_bad_yarn_values_name_key_value_and_file(change, words):
    with pytest.raises(ConfigError) as e:
        read({**YARN, **change})
    for word in ["cfg.json", "yarn", *words]:
        assert word in str(e.value), (word, str(e.value))


def test_missing_factor_and_null_top_level_original_are_refused():
    with pytest.raises(ConfigError, match="missing required key 'factor'"):
        read({"rope_type": "yarn", "original_max_position_embeddings": 32})
    with pytest.raises(ConfigError, match="original_max_position_embeddings"):
        read(YARN, original_max_position_embeddings=None)


def test_dynamic_ntk_stays_refused():
    for block in ({"rope_type": "dynamic", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}):
        with pytest.raises(ConfigError) as e:
            read(block)
        assert "'dynamic'" in str(e.value) and "yarn" in str(e.value)  # the supported list names yarn


def test_yarn_spec_round_trips_through_the_manifest():
    spec = spec_from_config({**BASE, "rope_scaling": {**YARN, "beta_fast": 16, "beta_slow": 2, "truncate": False,
                                                      "mscale": 1.0, "mscale_all_dim": 0.5}})
    assert spec_from_manifest(json.loads(json.dumps(spec.to_dict())), Path("manifest.json")) == spec


def test_manifest_written_before_yarn_still_loads():
    spec = spec_from_config({**BASE, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}})
    old = json.loads(json.dumps(spec.to_dict()))
    for key in ("beta_fast", "beta_slow", "truncate"):
        del old["rope_scaling"][key]
    assert spec_from_manifest(old, Path("manifest.json")) == spec


def test_no_length_to_default_from_is_named():
    config = {k: v for k, v in BASE.items() if k != "max_position_embeddings"}
    for block, why in (({"rope_type": "yarn", "factor": 4.0}, "'original_max_position_embeddings' is not given"),
                       ({**YARN, "factor": None}, "factor is null")):
        with pytest.raises(ConfigError) as e:
            spec_from_config({**config, "rope_scaling": block}, "cfg.json")
        assert why in str(e.value) and "'max_position_embeddings'" in str(e.value) and "cfg.json" in str(e.value)
