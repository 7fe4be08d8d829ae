"""config.json -> ModelSpec: Hugging Face names kept, fields derived, bad configs named precisely."""

import json

import pytest

from pllm.compiler.spec import ConfigError, ModelSpec, load_spec, spec_from_config

BASE = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "torch_dtype": "bfloat16",
    "eos_token_id": [2, 3],
}


def test_derived_fields_and_round_trip():
    spec = spec_from_config(BASE)
    assert (spec.head_dim, spec.q_size, spec.kv_size, spec.group_size) == (16, 64, 32, 2)
    assert spec.eos_token_ids == (2, 3) and spec.torch_dtype == "bfloat16" and not spec.attention_bias
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_qwen2_has_qkv_bias_and_explicit_head_dim():
    spec = spec_from_config({**BASE, "model_type": "qwen2", "head_dim": 32})
    assert spec.attention_bias and spec.head_dim == 32 and spec.q_size == 128


def test_transformers5_rope_parameters():
    cfg = {k: v for k, v in BASE.items() if k != "rope_theta"}
    cfg["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    spec = spec_from_config(cfg)
    assert spec.rope_theta == 5e5 and spec.rope_scaling.rope_type == "llama3"


@pytest.mark.parametrize(
    "config, key, values",
    [
        ({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rope_theta": 500.0},
         "rope_theta", ["500.0", "10000.0"]),
        ({**BASE, "model_type": "qwen3", "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
         "rope_theta", ["10000.0", "1000000.0"]),
        ({**BASE, "model_type": "phi3", "rope_scaling": None, "partial_rotary_factor": 0.5,
          "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 1.0}},
         "partial_rotary_factor", ["0.5", "1.0"]),
        ({**BASE, "model_type": "phi3", "rope_scaling": None, "rope_theta": 500.0,
          "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "rope_theta", ["500.0", "10000.0"]),
    ],
)
def test_a_rope_key_given_twice_with_two_values_is_refused(config, key, values):
    """transformers 5 reads rope_parameters and ignores the top-level copy: two values are a contradiction, named."""
    with pytest.raises(ConfigError) as e:
        spec_from_config(config, "cfg.json")
    for word in (f"'{key}'", f"'rope_parameters.{key}'", "cfg.json", *values):
        assert word in str(e.value)
    agreeing = {**config, key: config["rope_parameters"][key]}
    assert getattr(spec_from_config(agreeing), key) == config["rope_parameters"][key]


@pytest.mark.parametrize(
    "change, words",
    [
        ({"model_type": "gpt2"}, ["model_type", "'gpt2'", "cfg.json"]),
        ({"hidden_size": None}, ["hidden_size", "missing", "cfg.json"]),
        ({"num_key_value_heads": 3}, ["num_attention_heads", "num_key_value_heads", "cfg.json"]),
        ({"hidden_size": "64"}, ["hidden_size", "'64'"]),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, ["rope_scaling", "dynamic"]),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 2.0}}, ["llama3", "low_freq_factor"]),
        ({"rope_scaling": {"rope_type": "linear", "factor": -1}}, ["factor", "-1"]),
        ({"torch_dtype": "float64"}, ["torch_dtype", "float64"]),
        ({"hidden_act": "gelu"}, ["hidden_act", "gelu"]),
        ({"attention_bias": True}, ["attention_bias", "llama", "o_proj", "cfg.json"]),  # HF biases o_proj too
    ],
)
def test_bad_configs_name_key_and_file(change, words):
    cfg = {**BASE, **change}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        spec_from_config(cfg, "cfg.json")
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("model_type", ["mistral", "phi3"])
def test_mistral_and_phi3_windows_make_every_layer_windowed(model_type):
    """transformers windows every layer whenever `sliding_window` is set (Phi-3-mini-4k: 2047 of 4096), and reads
    no `use_sliding_window` for these families: a false one switches nothing off."""
    for extra in ({}, {"use_sliding_window": False}):
        spec = spec_from_config({**BASE, "model_type": model_type, "sliding_window": 128, **extra})
        assert spec.sliding_window == 128 and spec.sliding_layers == (0, 1) and spec.layer_window(1) == 128


def test_llama_reads_no_window():
    spec = spec_from_config({**BASE, "sliding_window": 128, "use_sliding_window": True})  # transformers' llama neither
    assert spec.sliding_window is None and spec.sliding_layers == ()


def test_sliding_window_that_covers_the_context_is_accepted():
    spec = spec_from_config({**BASE, "model_type": "mistral", "sliding_window": 4096})
    assert spec.model_type == "mistral"
    spec = spec_from_config({**BASE, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": 64})
    assert spec.model_type == "qwen2"


def test_load_spec_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_spec(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_spec(tmp_path / "config.json")


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize(
    "change, words",
    [
        ({"eos_token_id": "abc"}, ["eos_token_id", "'abc'"]),
        ({"eos_token_id": [2, "x"]}, ["eos_token_id", "'x'"]),
        ({"eos_token_id": [2.5]}, ["eos_token_id", "2.5"]),
        ({"eos_token_id": True}, ["eos_token_id", "True"]),
        ({"eos_token_id": 100}, ["eos_token_id", "100", "vocab_size=100"]),
        ({"bos_token_id": -1}, ["bos_token_id", "-1"]),
        ({"model_type": "mistral", "sliding_window": "abc"}, ["sliding_window", "'abc'"]),
        ({"model_type": "qwen2", "use_sliding_window": "yes"}, ["use_sliding_window", "'yes'"]),
        ({"model_type": "mistral", "sliding_window": 8, "layer_types": ["full_attention"] * 2}, ["layer_types"]),
        ({"max_position_embeddings": 10**15}, ["max_position_embeddings", str(10**15), str(2**27)]),
        ({"rope_theta": -1.0}, ["rope_theta", "-1.0"]),
        ({"rope_theta": 0}, ["rope_theta", "0"]),
        ({"rope_theta": float("nan")}, ["rope_theta", "nan"]),
        ({"rope_theta": float("inf")}, ["rope_theta", "inf"]),
        ({"rms_norm_eps": -1e-6}, ["rms_norm_eps", "-1e-06"]),
        ({"rms_norm_eps": float("nan")}, ["rms_norm_eps", "nan"]),
        ({"rms_norm_eps": 0.0}, ["rms_norm_eps", "0.0"]),
        ({"rope_parameters": "x"}, ["rope_parameters", "'x'"]),
        ({"tie_word_embeddings": "false"}, ["tie_word_embeddings", "'false'"]),
        ({"rope_scaling": {**LLAMA3, "low_freq_factor": "abc"}}, ["low_freq_factor", "'abc'"]),
        ({"rope_scaling": {**LLAMA3, "high_freq_factor": 1.0}}, ["high_freq_factor", "low_freq_factor"]),
        ({"rope_scaling": {**LLAMA3, "original_max_position_embeddings": "64"}}, ["original_max_position", "'64'"]),
        ({"rope_scaling": {"rope_type": "linear", "factor": float("inf")}}, ["factor", "inf"]),
    ],
)
def test_hostile_values_name_key_value_and_file(change, words):
    with pytest.raises(ConfigError) as e:
        spec_from_config({**BASE, **change}, "cfg.json")
    for w in ["cfg.json", *words]:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("config", [[1, 2], "llama", None, 3])
def test_config_that_is_not_an_object(config):
    with pytest.raises(ConfigError, match="cfg.json: must be a JSON object"):
        spec_from_config(config, "cfg.json")


GEMMA3 = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 100}


def test_gemma3_quirks_read_from_transformers_keys():
    """transformers 5's layer_types and per-layer-type rope_parameters; Gemma3TextConfig's defaults fill the rest."""
    spec = spec_from_config({**GEMMA3, "layer_types": ["sliding_attention", "full_attention"] * 3,
                             "sliding_window": 512, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 50.0,
                             "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                    "rope_theta": 1e6},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}})
    assert spec.sliding_layers == (0, 2, 4) and spec.sliding_window == 512
    assert spec.layer_window(0) == 512 and spec.layer_window(1) is None
    assert (spec.rope_theta, spec.rope_local_theta) == (1e6, 1e4) and spec.rope_scaling.rope_type == "linear"
    assert spec.attention_scale == 24**-0.5 and spec.attn_logit_softcapping == 50.0
    assert spec.final_logit_softcapping is None and spec.qk_norm and spec.norm_weight_offset == 1.0
    assert spec.hidden_act == "gelu_pytorch_tanh" and spec.tie_word_embeddings
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_gemma3_older_keys_and_the_multimodal_wrapper():
    """sliding_window_pattern and rope_local_base_freq (configs before transformers 5); a gemma3 checkpoint's
    text_config, with the token ids at the top level."""
    old = {**GEMMA3, "sliding_window_pattern": 3, "rope_theta": 5e5, "rope_local_base_freq": 2e4}
    spec = spec_from_config(old)
    assert spec.sliding_layers == (0, 1, 3, 4) and (spec.rope_theta, spec.rope_local_theta) == (5e5, 2e4)
    assert spec.sliding_window == 4096 and spec.attention_scale == 256**-0.5  # Gemma3TextConfig's defaults
    wrapped = spec_from_config({"model_type": "gemma3", "text_config": old, "eos_token_id": [1, 7],
                                "vision_config": {"hidden_size": 32}})
    assert wrapped.model_type == "gemma3" and wrapped.eos_token_ids == (1, 7)
    assert wrapped.sliding_layers == spec.sliding_layers and wrapped.hidden_size == 64


# qwen3 ----------------------------------------------------------------------------------------------------------
QWEN3 = {**BASE, "model_type": "qwen3", "head_dim": 32}


def test_qwen3_has_qk_norm_explicit_head_dim_and_no_bias():
    spec = spec_from_config(QWEN3)
    assert spec.qk_norm and spec.norm_weight_offset == 0.0 and not spec.attention_bias
    assert spec.head_dim == 32 and spec.q_size == 128 != spec.hidden_size
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert not spec_from_config(BASE).qk_norm


def test_qwen3_head_dim_defaults_to_128_as_transformers():
    cfg = {k: v for k, v in QWEN3.items() if k != "head_dim"}
    assert spec_from_config(cfg).head_dim == 128


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
@pytest.mark.parametrize(("layers", "windowed"), [({"max_window_layers": 1}, (1,)), ({"max_window_layers": 0}, (0, 1)),
                                                  ({"layer_types": ["sliding_attention", "full_attention"]}, (0,))])
def test_qwen_window_reaches_the_layers_transformers_windows(model_type, layers, windowed):
    spec = spec_from_config({**QWEN3, "model_type": model_type, "use_sliding_window": True, "sliding_window": 64,
                             **layers})
    assert spec.sliding_window == 64 and spec.sliding_layers == windowed


def test_qwen3_window_that_changes_nothing_is_accepted():
    # transformers drops the window unless use_sliding_window is set (the default)
    assert spec_from_config({**QWEN3, "sliding_window": 64}).qk_norm
    assert spec_from_config({**QWEN3, "use_sliding_window": True, "sliding_window": 256}).qk_norm


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
@pytest.mark.parametrize("layers", [{"max_window_layers": 2}, {}, {"layer_types": ["full_attention"] * 2}])
def test_qwen_window_that_no_layer_uses_is_accepted(model_type, layers):
    """transformers windows only layer_types' sliding_attention layers, else those from max_window_layers (default
    28) on: with none of the 2 layers past it, the window is in effect nowhere and the build attends fully."""
    spec = spec_from_config({**QWEN3, "model_type": model_type, "use_sliding_window": True, "sliding_window": 8,
                             **layers})
    assert spec.sliding_window is None and spec.sliding_layers == ()


@pytest.mark.parametrize(
    "change, words",
    [
        ({"layer_types": ["sliding_attention"]}, ["layer_types", "num_hidden_layers=6"]),
        ({"layer_types": ["chunked_attention"] * 6}, ["layer_types", "chunked_attention"]),
        ({"hidden_activation": "relu"}, ["hidden_activation", "relu"]),
        ({"attention_bias": True}, ["attention_bias"]),
        ({"use_bidirectional_attention": True}, ["use_bidirectional_attention"]),
        ({"sliding_window": 0}, ["sliding_window", "0"]),
        ({"attn_logit_softcapping": -1.0}, ["attn_logit_softcapping", "-1.0"]),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, ["rope_parameters", "layer types"]),
        ({"rope_parameters": {"sliding_attention": {"rope_type": "yarn"}}}, ["sliding_attention", "yarn"]),
        ({"model_type": "gemma3"}, ["text_config", "missing"]),
    ],
)
def test_gemma3_bad_configs_name_key_and_file(change, words):
    with pytest.raises(ConfigError) as e:
        spec_from_config({**GEMMA3, **change}, "cfg.json")
    assert "cfg.json" in str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize(
    "change, words",
    [
        ({"attention_bias": True}, ["attention_bias", "qwen3", "cfg.json"]),
        ({"use_sliding_window": True, "sliding_window": 64, "layer_types": ["full_attention"]},
         ["layer_types", "num_hidden_layers=2"]),
        ({"use_sliding_window": True, "sliding_window": 64, "max_window_layers": -1}, ["max_window_layers", "-1"]),
        ({"head_dim": 0}, ["head_dim", "0", "cfg.json"]),
        ({"head_dim": 33}, ["head_dim", "33", "cfg.json"]),
        ({"use_sliding_window": "yes"}, ["use_sliding_window", "'yes'"]),
    ],
)
def test_qwen3_bad_configs_name_key_and_file(change, words):
    with pytest.raises(ConfigError) as e:
        spec_from_config({**QWEN3, **change}, "cfg.json")
    for word in words:
        assert word in str(e.value)


# phi3 -----------------------------------------------------------------------------------------------------------
PHI3 = {**BASE, "model_type": "phi3", "original_max_position_embeddings": 64, "rope_scaling": None}
LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0]}


def test_phi3_without_rope_scaling_is_the_llama_shape():
    spec = spec_from_config(PHI3)
    assert spec.rope_scaling is None and spec.rotary_dim == spec.head_dim == 16 and not spec.attention_bias


def test_phi3_partial_rotary_and_longrope_in_both_config_formats():
    old = spec_from_config({**PHI3, "partial_rotary_factor": 0.5, "rope_scaling": LONGROPE})
    # transformers 5 writes rope_parameters, with the rotary fraction and the original length inside
    new_rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "original_max_position_embeddings": 64, **{k: v for k, v in LONGROPE.items() if k != "type"}}
    new = spec_from_config({**{k: v for k, v in PHI3.items() if k != "rope_theta"}, "rope_parameters": new_rope})
    assert old == new and old.rotary_dim == 8 and old.partial_rotary_factor == 0.5
    rs = old.rope_scaling
    assert rs.rope_type == "longrope" and rs.original_max_position_embeddings == 64
    assert rs.short_factor == (1.0, 1.5, 2.0, 3.0) and rs.long_factor == (2.0, 4.0, 8.0, 16.0)
    # factor = max_position_embeddings / original = 4: attention factor sqrt(1 + ln 4 / ln 64), as transformers
    assert rs.factor == 4.0 and rs.attention_factor == pytest.approx((1 + 1 / 3) ** 0.5)
    assert ModelSpec.from_dict(json.loads(json.dumps(old.to_dict()))) == old
    # the older Phi-3 configs' "su" is longrope; an explicit attention factor is kept
    su = spec_from_config({**PHI3, "partial_rotary_factor": 0.5,
                           "rope_scaling": {**LONGROPE, "type": "su", "attention_factor": 1.0}})
    assert su.rope_scaling.rope_type == "longrope" and su.rope_scaling.attention_factor == 1.0


@pytest.mark.parametrize(
    "change, words",
    [
        ({"partial_rotary_factor": 0}, ["partial_rotary_factor", "0", "cfg.json"]),
        ({"partial_rotary_factor": 1.5}, ["partial_rotary_factor", "1.5"]),
        ({"partial_rotary_factor": 0.2}, ["partial_rotary_factor", "0.2", "head_dim 16 -> 3"]),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, ["rope_scaling", "dynamic", "phi3", "cfg.json"]),
        ({"partial_rotary_factor": 0.5, "rope_scaling": {**LONGROPE, "short_factor": [1.0, 2.0]}},
         ["short_factor", "4 finite positive"]),
        ({"partial_rotary_factor": 0.5, "rope_scaling": {**LONGROPE, "long_factor": [1.0] * 3 + ["x"]}},
         ["long_factor", "'x'"]),
        ({"partial_rotary_factor": 0.5, "rope_scaling": {**LONGROPE, "long_factor": [1.0] * 3 + [-1.0]}},
         ["long_factor", "-1.0"]),
        ({"rope_scaling": LONGROPE}, ["short_factor", "8 finite positive"]),  # full rotary: 8 frequencies
        ({"partial_rotary_factor": 0.5, "rope_scaling": {k: v for k, v in LONGROPE.items() if k != "short_factor"}},
         ["short_factor", "missing"]),
        ({"partial_rotary_factor": 0.5, "original_max_position_embeddings": None, "rope_scaling": LONGROPE},
         ["original_max_position_embeddings", "missing"]),
        ({"rope_scaling": "longrope"}, ["rope_scaling", "'longrope'"]),
        ({"attention_bias": True}, ["attention_bias", "phi3"]),
    ],
)
def test_phi3_bad_configs_name_key_and_file(change, words):
    with pytest.raises(ConfigError) as e:
        spec_from_config({**PHI3, **change}, "cfg.json")
    for word in words:
        assert word in str(e.value)
