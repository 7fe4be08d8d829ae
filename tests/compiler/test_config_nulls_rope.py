"""config.json corners where pllm once ran a config differently from transformers 5: explicit nulls replaced by
defaults, `rope_scaling` and `rope_parameters` both given, and gemma3's legacy `type` spelling. Each case checks
what transformers itself does, so a transformers upgrade that changes the rule fails here first."""

import json
import shutil

import pytest
import torch
import transformers

from pllm import LLM, SamplingParams
from pllm.compiler.build import BuildOptions, build
from pllm.compiler.spec import ConfigError, spec_from_config

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256}
GEMMA3 = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
          "max_position_embeddings": 256, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}


def hf_config(config: dict):
    fields = {k: v for k, v in config.items() if k != "model_type"}
    return transformers.AutoConfig.for_model(config["model_type"], **fields)


def refused(config: dict, *words: str) -> None:
    with pytest.raises(ConfigError) as e:
        spec_from_config(config, "cfg.json")
    for word in ("cfg.json", *words):
        assert word in str(e.value), (word, str(e.value))


# ---- A: gemma3's legacy `type` spelling --------------------------------------------------------------------------

def test_gemma3_legacy_type_spelling_is_refused_as_transformers_ignores_it():
    config = {**GEMMA3, "rope_scaling": {"type": "linear", "factor": 4.0}}
    assert hf_config(config).rope_parameters["full_attention"]["rope_type"] == "default"  # no scaling in transformers
    refused(config, "'rope_scaling'", "'type'", "'linear'", "rope_type")
    spelled = {**GEMMA3, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}
    assert hf_config(spelled).rope_parameters["full_attention"]["rope_type"] == "linear"
    assert spec_from_config(spelled).rope_scaling.factor == 4.0


def test_gemma3_rope_scaling_is_merged_over_rope_parameters_as_transformers_does():
    config = {**GEMMA3, "rope_scaling": {"rope_type": "linear", "factor": 4.0},
              "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 5e5},
                                  "sliding_attention": {"rope_type": "default"}},
              "rope_local_base_freq": 2e4}
    want = hf_config(config).rope_parameters
    spec = spec_from_config(config)
    assert (spec.rope_scaling.rope_type, spec.rope_scaling.factor) == (want["full_attention"]["rope_type"], 4.0)
    assert (spec.rope_theta, spec.rope_local_theta) == (5e5, want["sliding_attention"]["rope_theta"]) == (5e5, 2e4)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_the_type_spelling_scales_flat_rope_as_transformers_does(model_type):
    config = {**LLAMA, "model_type": model_type, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}}
    want = hf_config(config).rope_parameters
    spec = spec_from_config(config)
    assert (spec.rope_scaling.rope_type, spec.rope_scaling.factor, spec.rope_theta) == (
        want["rope_type"], want["factor"], want["rope_theta"]) == ("linear", 4.0, 5e5)


# ---- B: rope_scaling and rope_parameters both given ---------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("top_theta", [None, 300.0])
def test_rope_scaling_drops_rope_parameters_as_transformers_does(model_type, top_theta):
    config = {**LLAMA, "model_type": model_type, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
              "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}
    if top_theta is not None:
        config["rope_theta"] = top_theta
    want = hf_config(config).rope_parameters
    spec = spec_from_config(config)
    assert (spec.rope_theta, spec.rope_scaling.factor) == (want["rope_theta"], want["factor"])
    assert spec.rope_theta == (top_theta or 10000.0)


def test_phi3_takes_its_theta_from_the_block_transformers_reads():
    """rope_scaling given: rope_parameters is dropped whole, its theta too, for phi3 as for the others."""
    for top_theta in (None, 300.0):
        config = {**LLAMA, "model_type": "phi3", "rope_scaling": {"rope_type": "default"},
                  "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}
        if top_theta is not None:
            config["rope_theta"] = top_theta
        assert spec_from_config(config).rope_theta == hf_config(config).rope_parameters["rope_theta"] == (
            top_theta or 10000.0)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "phi3"])
def test_an_absent_theta_is_the_config_class_default(model_type):
    """MixtralConfig's default_theta is 1e6, the others' 1e4."""
    config = {**LLAMA, "model_type": model_type, "num_local_experts": 4, "num_experts_per_tok": 2,
              "num_experts": 4, "moe_intermediate_size": 32}
    if model_type not in ("mixtral", "qwen3_moe"):
        config = {k: v for k, v in config.items() if k not in ("num_local_experts", "num_experts_per_tok",
                                                                "num_experts", "moe_intermediate_size")}
    assert spec_from_config(config).rope_theta == hf_config(config).rope_parameters["rope_theta"]


def test_a_theta_inside_rope_scaling_is_the_theta():
    config = {**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 900.0},
              "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}
    assert spec_from_config(config).rope_theta == hf_config(config).rope_parameters["rope_theta"] == 900.0
    refused({**config, "rope_theta": 700.0}, "'rope_theta'", "'rope_scaling.rope_theta'", "700.0", "900.0")


def test_rope_scaling_with_rope_parameters_generates_as_transformers_does(tiny_dir, tmp_path):
    src = tmp_path / "model"
    shutil.copytree(tiny_dir("llama"), src)
    config = json.loads((src / "config.json").read_text())
    config.pop("rope_theta", None)
    config.update(rope_scaling={"rope_type": "linear", "factor": 2.0},
                  rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    (src / "config.json").write_text(json.dumps(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    prompts = [[5, 17, 42, 99, 7], list(range(3, 43))]
    want = [hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
            for p in prompts]
    llm = LLM(str(build(str(src), tmp_path / "build", BuildOptions(dtype="float32", progress=False))), backend="cpu")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want


# ---- C: explicit nulls --------------------------------------------------------------------------------------------

def _hf_refuses(config: dict) -> bool:
    try:
        hf_config(config)
    except Exception:  # transformers' strict dataclass validation
        return True
    return False


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mixtral"])
@pytest.mark.parametrize("key", ["rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "attention_bias"])
def test_a_null_transformers_refuses_is_refused_by_name(model_type, key):
    if (model_type, key) == ("mixtral", "attention_bias"):
        pytest.skip("MixtralConfig has no attention_bias field: its null is ignored (llama.py's rule, not config.py)")
    config = {**LLAMA, "model_type": model_type, key: None}
    if model_type == "mixtral":
        config.update(num_local_experts=4, num_experts_per_tok=2)
    assert _hf_refuses(config)
    refused(config, f"'{key}'", "null")


@pytest.mark.parametrize("key", ["sliding_window", "query_pre_attn_scalar", "rms_norm_eps", "max_position_embeddings",
                                 "tie_word_embeddings", "head_dim", "hidden_activation"])
def test_a_gemma3_null_is_refused_not_replaced_by_the_class_default(key):
    config = {**GEMMA3, key: None}
    if key != "sliding_window":  # Gemma3TextConfig takes it, then the model fails to build its mask
        assert _hf_refuses(config)
    refused(config, f"'{key}'", "null")


def test_a_null_rope_theta_is_refused_unless_the_block_gives_one():
    assert hf_config({**LLAMA, "rope_theta": None}).rope_parameters["rope_theta"] is None  # the model cannot build
    refused({**LLAMA, "rope_theta": None}, "'rope_theta'", "null")
    with_block = {**LLAMA, "rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}
    assert spec_from_config(with_block).rope_theta == hf_config(with_block).rope_parameters["rope_theta"] == 500.0
    refused({**GEMMA3, "rope_local_base_freq": None}, "'rope_local_base_freq'", "null")


@pytest.mark.parametrize(
    "config",
    [
        {**LLAMA, "rope_scaling": None, "rope_parameters": None, "sliding_window": None, "head_dim": None,
         "num_key_value_heads": None, "bos_token_id": None, "eos_token_id": None, "torch_dtype": None},
        {**LLAMA, "model_type": "mistral", "sliding_window": None},
        {**LLAMA, "model_type": "qwen2", "sliding_window": None, "layer_types": None},
        {**GEMMA3, "rope_scaling": None, "rope_parameters": None, "layer_types": None, "attn_logit_softcapping": None,
         "final_logit_softcapping": None, "use_bidirectional_attention": None, "bos_token_id": None},
    ],
    ids=["llama", "mistral", "qwen2", "gemma3"],
)
def test_nulls_transformers_reads_as_absent_keep_working(config):
    want = hf_config(config)
    spec = spec_from_config(config, "cfg.json")
    head_dim = getattr(want, "head_dim", want.hidden_size // want.num_attention_heads)  # Qwen2Config has none
    assert (spec.num_key_value_heads, spec.head_dim) == (want.num_key_value_heads, head_dim)
    assert spec.rms_norm_eps == want.rms_norm_eps and spec.rope_scaling is None


def test_a_null_head_dim_is_derived_where_transformers_derives_it_and_refused_for_qwen3():
    for model_type in ("llama", "mistral", "qwen2"):
        config = {**LLAMA, "model_type": model_type, "head_dim": None}
        assert spec_from_config(config).head_dim == 16
    from huggingface_hub.errors import StrictDataclassError

    with pytest.raises(StrictDataclassError, match="head_dim"):  # transformers' own refusal
        hf_config({**LLAMA, "model_type": "qwen3", "head_dim": None})
    refused({**LLAMA, "model_type": "qwen3", "head_dim": None}, "'head_dim'", "null", "qwen3")
