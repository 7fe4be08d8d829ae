"""Greedy output equals Hugging Face transformers token for token, in float32, on the same weights."""

import pytest
import torch
import transformers

from pllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
TINY_PROMPTS = [
    "Hello, world!",
    "Paged attention keeps the KV cache",
    "Grüße aus Köln. こんにちは",
    "def main():",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog again and again.",
]


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model.generation_config.eos_token_id = None  # ignore EOS, as the pllm side does
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids) :].tolist()


TINY_CASES = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "num_key_value_heads": 1}),
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    ("mistral", {}),
    ("mistral", {"sliding_window": 6}),  # every layer windowed, shorter than most prompts
]


@pytest.mark.parametrize("model_type, overrides", TINY_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(TINY_CASES)])
def test_tiny_models_match_hf(tiny_dir, tiny_build, model_type, overrides):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir(model_type, **overrides)), dtype=torch.float32)
    llm = LLM(str(tiny_build(model_type, **overrides)), backend="cpu", kv_cache_memory=1 << 24)
    # decode steps run compiled whole (cpu_decode_step), except on windowed models
    assert (llm.engine.runner.model.decode_stack is None) == ("sliding_window" in overrides)
    outs = llm.generate(TINY_PROMPTS, GREEDY, use_tqdm=False)
    for out in outs:
        assert len(out.outputs[0].token_ids) == 32
        assert out.outputs[0].token_ids == hf_greedy(hf, out.prompt_token_ids, 32), out.prompt


SMOL_PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "def fibonacci(n):",
    "Les plus beaux paysages de France sont",
    "日本の首都は",
    "Once upon a time",
    "List three colors:",
    "The theory of relativity",
]


@pytest.mark.slow
def test_smollm2_matches_hf(smollm2_build, smollm2_hf):
    """Batched, chunked (16-token budget), preempted (a 12-block KV cache) and prefix-cached runs all equal HF."""
    kv_block_bytes = 2 * 30 * 16 * 3 * 64 * 4  # k and v, layers, block size, kv heads, head_dim, fp32
    llm = LLM(str(smollm2_build), backend="cpu", kv_cache_memory=12 * kv_block_bytes, max_num_batched_tokens=16)
    chat = {"prompt_token_ids": llm.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])}
    prompts = [*SMOL_PROMPTS, chat]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    refs = [hf_greedy(smollm2_hf, out.prompt_token_ids, 32) for out in outs]
    for out, ref in zip(outs, refs):
        assert out.outputs[0].token_ids == ref, out.prompt
    text = outs[0].outputs[0].text
    assert text == llm.tokenizer.decode(outs[0].outputs[0].token_ids, skip_special_tokens=True)
    llm.generate([chat], GREEDY, use_tqdm=False)
    again = llm.generate([chat], GREEDY, use_tqdm=False)[0]  # served partly from the prefix cache
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == refs[-1]
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


# The newer families, each with its quirks switched on: 8 prompts x 24 tokens, batched; then again with chunked
# prefill (a 16-token step budget) and preemption (an 8-block KV cache) on the same build.
FAMILY_PROMPTS = [
    "Hello, world!",
    "Paged attention keeps the KV cache",
    "Grüße aus Köln. こんにちは",
    "def main():",
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "numbers 0123456789 and more numbers",
    "Bonjour le monde. The quick brown fox jumps over the lazy dog again and again.",
]
FAMILY_GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
FAMILY_CASES = [
    ("qwen3", {"head_dim": 32}),  # q width 128 != hidden 64
    ("qwen3", {"head_dim": 32, "tie_word_embeddings": True, "num_key_value_heads": 1}),
    ("phi3", {"rope_scaling": None}),  # fused qkv_proj and gate_up_proj, full rotary
    ("phi3", {"partial_rotary_factor": 0.5, "num_key_value_heads": 1, "tie_word_embeddings": True}),
]
# Phi-3 128k's scaling, tiny: head_dim 16, rotary on 8 dims (4 frequencies), long factors past 16 positions
PHI3_LONGROPE = {
    "partial_rotary_factor": 0.5,
    "max_position_embeddings": 128,
    "original_max_position_embeddings": 16,
    "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
                     "long_factor": [2.0, 4.0, 8.0, 16.0]},
}


def kv_block_bytes(config, block_size: int = 16) -> int:
    """K and V of every layer for one fp32 block."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * head_dim * 4


def check_family_matches_hf(hf, build, prompts: list[str] = FAMILY_PROMPTS) -> list:
    """The outputs of the constrained run, after every output of both runs has been checked."""
    refs: list[list[int]] | None = None
    constrained = dict(kv_cache_memory=8 * kv_block_bytes(hf.config), max_num_batched_tokens=16)
    for settings in (dict(kv_cache_memory=1 << 24), constrained):
        llm = LLM(str(build), backend="cpu", **settings)
        outs = llm.generate(prompts, FAMILY_GREEDY, use_tqdm=False)
        if refs is None:
            refs = [hf_greedy(hf, out.prompt_token_ids, 24) for out in outs]
        for out, ref in zip(outs, refs):
            assert len(out.outputs[0].token_ids) == 24
            assert out.outputs[0].token_ids == ref, (settings, out.prompt)
        assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    assert llm.engine.scheduler.num_preemptions > 0
    return outs


@pytest.mark.parametrize("model_type, overrides", FAMILY_CASES,
                         ids=[f"{m}-{i}" for i, (m, _) in enumerate(FAMILY_CASES)])
def test_family_matches_hf_batched_chunked_preempted(tiny_dir, tiny_build, model_type, overrides):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir(model_type, **overrides)), dtype=torch.float32)
    check_family_matches_hf(hf, tiny_build(model_type, **overrides))


def test_phi3_longrope_matches_hf_across_the_original_length(tiny_dir, tiny_build):
    """transformers picks the long factors per forward when max(position) + 1 > original_max_position_embeddings:
    prompts longer than the original length use them throughout, shorter ones switch when generation crosses it
    (the cached keys keep their short-factor rotation). Both kinds are here, batched, chunked and preempted."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir("phi3", **PHI3_LONGROPE)), dtype=torch.float32)
    assert hf.config.rope_parameters["rope_type"] == "longrope" and hf.model.rotary_emb.attention_scaling > 1
    outs = check_family_matches_hf(hf, tiny_build("phi3", **PHI3_LONGROPE))
    original = PHI3_LONGROPE["original_max_position_embeddings"]
    prompt_lens = [len(out.prompt_token_ids) for out in outs]
    assert any(n > original for n in prompt_lens), prompt_lens
    assert any(n <= original < n + 24 for n in prompt_lens), prompt_lens
