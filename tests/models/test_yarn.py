"""YaRN RoPE scaling: pllm's cos/sin table equals transformers' bit for bit, and greedy output equals transformers'
on tiny random models whose sequences run well past original_max_position_embeddings."""

import dataclasses
import json

import pytest
import torch
import transformers

from pllm import LLM, SamplingParams
from pllm.compiler.spec import load_spec
from pllm.models.rotary import rope_cos_sin

NUM_POSITIONS = 300  # past every original length below, and past max_position_embeddings where it is 256
FAMILY_KEYS = {
    "llama": {},
    "qwen2": {},
    "mistral": {"sliding_window": None},
    "qwen3": {},
    "mixtral": {"num_local_experts": 2, "num_experts_per_tok": 1},
    "qwen3_moe": {"num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 16},
}
QWEN_LONG = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}
DEEPSEEK = {"rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 16, "mscale": 1.0,
                             "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}}
VARIANTS = {
    "qwen-long-context": QWEN_LONG,
    "deepseek-mscale": DEEPSEEK,
    "betas-untruncated": {"rope_scaling": {"type": "yarn", "factor": 8, "original_max_position_embeddings": 64,
                                           "beta_fast": 16, "beta_slow": 2, "truncate": False}},
    "beta-zero-is-default": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 0,
                                              "original_max_position_embeddings": 32}},
    "null-factor-derived": {"rope_scaling": {"rope_type": "yarn", "factor": None,
                                             "original_max_position_embeddings": 64}},
    "given-attention-factor": {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "attention_factor": 0.9,
                                                "original_max_position_embeddings": 32}},
    "top-level-original-length": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0},
                                  "original_max_position_embeddings": 16},
    "original-length-defaults-to-max": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
    "rope-parameters-with-theta": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                                       "original_max_position_embeddings": 32}},
}
CASES = [("llama", name) for name in VARIANTS] + [
    (family, name) for family in FAMILY_KEYS if family != "llama" for name in ("qwen-long-context", "deepseek-mscale")
]


def write_config(tmp_path, model_type: str, overrides: dict):
    config = {"model_type": model_type, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 32,
              "max_position_embeddings": 256, "rope_theta": 10000.0, **FAMILY_KEYS[model_type], **overrides}
    if "rope_parameters" in overrides:
        del config["rope_theta"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path / "config.json"


@pytest.mark.parametrize("model_type, variant", CASES, ids=[f"{m}-{v}" for m, v in CASES])
def test_yarn_table_equals_transformers_cos_and_sin(tmp_path, model_type, variant):
    """The same config.json read by both: inverse frequencies, the ramp and the attention factor folded into cos and
    sin, torch.equal with the rotary embedding transformers builds for the family."""
    path = write_config(tmp_path, model_type, VARIANTS[variant])
    config = transformers.AutoConfig.from_pretrained(str(tmp_path))
    rotary = transformers.AutoModelForCausalLM.from_config(config).model.rotary_emb
    assert rotary.rope_type == "yarn"
    positions = torch.arange(NUM_POSITIONS)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)  # [1, positions, head_dim] each

    spec = load_spec(path)
    assert spec.rope_scaling.rope_type == "yarn"
    assert spec.rope_scaling.attention_factor == rotary.attention_scaling
    table = rope_cos_sin(spec, NUM_POSITIONS)  # [positions, head_dim]: cos half, then sin half
    half = spec.rotary_dim // 2
    assert torch.equal(table[:, :half], cos[0, :, :half])
    assert torch.equal(table[:, half:], sin[0, :, :half])
    plain = rope_cos_sin(dataclasses.replace(spec, rope_scaling=None), NUM_POSITIONS)
    assert not torch.equal(plain, table)  # the scaling changed something


GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
# a prompt that ends before the original length and crosses it while generating, one that starts past it, one ~100
PROMPT_LENGTHS = (20, 45, 100)


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model.generation_config.eos_token_id = None  # ignore EOS, as the pllm side does
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


GREEDY_CASES = [
    ("llama", QWEN_LONG),
    ("qwen2", QWEN_LONG),
    ("qwen3", {"head_dim": 32, **DEEPSEEK}),
]


@pytest.mark.parametrize("model_type, overrides", GREEDY_CASES, ids=[m for m, _ in GREEDY_CASES])
def test_yarn_greedy_matches_hf_past_the_original_length(tiny_dir, tiny_build, model_type, overrides):
    """fp32, up to 124 positions against an original length of 16 or 32; batched, then chunked (16-token steps)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir(model_type, **overrides)), dtype=torch.float32)
    assert hf.config.rope_parameters["rope_type"] == "yarn" and hf.model.rotary_emb.attention_scaling > 1
    gen = torch.Generator().manual_seed(0)
    vocab = hf.config.vocab_size
    prompts = [{"prompt_token_ids": torch.randint(3, vocab, (n,), generator=gen).tolist()} for n in PROMPT_LENGTHS]
    refs = [hf_greedy(hf, p["prompt_token_ids"], 24) for p in prompts]
    build = tiny_build(model_type, **overrides)
    for settings in ({}, {"max_num_batched_tokens": 16}):
        llm = LLM(str(build), backend="cpu", kv_cache_memory=1 << 24, **settings)
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        for out, ref in zip(outs, refs):
            assert out.outputs[0].token_ids == ref, (settings, len(out.prompt_token_ids))
