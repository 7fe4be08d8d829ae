"""Mixture-of-experts families: greedy output equals transformers in fp32, batched, chunked and preempted; interpret
equals cpu."""

import logging

import pytest
import torch
import transformers

from pllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = [
    "Hello, world!",
    "Paged attention keeps the KV cache",
    "Grüße aus Köln. こんにちは",
    "def main():\n    return 42",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog again.",
    "a",
    "Bonjour le monde. 你好，世界!",
    "numbers 0123456789 and more numbers",
]
# top-2 of 4 experts, and top-3; qwen3_moe with its q/k norms, dense MLP layers mixed in (mlp_only_layers, or
# decoder_sparse_step 2: layers 1 and 3 sparse) and norm_topk_prob both ways
CASES = {
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 64}),
    "mixtral-top3-gqa4": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 3, "intermediate_size": 48,
                                      "num_key_value_heads": 1}),
    "qwen3_moe-norm-mlp-only": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                              "norm_topk_prob": True, "mlp_only_layers": [0]}),
    "qwen3_moe-step2": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                                      "norm_topk_prob": False, "decoder_sparse_step": 2, "num_hidden_layers": 4}),
}


def kv_block_bytes(overrides: dict) -> int:
    """(k, v) x layers x 16 tokens per block x kv heads x head_dim 16 x fp32 (tests/tiny_models.py's defaults)."""
    return 2 * overrides.get("num_hidden_layers", 2) * 16 * overrides.get("num_key_value_heads", 2) * 16 * 4


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model.generation_config.eos_token_id = None  # ignore EOS, as the pllm side does
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids) :].tolist()


@pytest.fixture(scope="module")
def hf_refs(tiny_dir):
    """Case -> prompt -> transformers' greedy tokens, each prompt run alone."""
    refs = {}

    def get(case: str, prompt_token_ids: list[int]) -> list[int]:
        model_type, overrides = CASES[case]
        if case not in refs:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir(model_type, **overrides)),
                                                                      dtype=torch.float32)
            refs[case] = (model, {})
        model, cache = refs[case]
        key = tuple(prompt_token_ids)
        if key not in cache:
            cache[key] = hf_greedy(model, prompt_token_ids, GREEDY.max_tokens)
        return cache[key]

    return get


@pytest.mark.parametrize("case", CASES)
def test_moe_matches_hf_batched_chunked_and_preempted(tiny_build, hf_refs, case, caplog):
    model_type, overrides = CASES[case]
    build = str(tiny_build(model_type, **overrides))
    with caplog.at_level(logging.INFO):
        batched = LLM(build, backend="cpu", kv_cache_memory=1 << 24).generate(PROMPTS, GREEDY, use_tqdm=False)
    assert "in PyTorch always: " in caplog.text and "mixture of experts" in caplog.text  # the log says which
    for out in batched:
        assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
        assert out.outputs[0].token_ids == hf_refs(case, out.prompt_token_ids), out.prompt
    # a 16-token step budget chunks every longer prompt; 12 KV blocks cannot hold 8 sequences, so some are preempted
    tight = LLM(build, backend="cpu", kv_cache_memory=12 * kv_block_bytes(overrides), max_num_batched_tokens=16)
    outs = tight.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    for out in outs:
        assert out.outputs[0].token_ids == hf_refs(case, out.prompt_token_ids), out.prompt
    assert tight.engine.kv.num_free_blocks == tight.engine.kv.num_blocks


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe-norm-mlp-only"])  # the interpreter is slow: one per family
def test_moe_interpret_equals_cpu(tiny_build, case):
    """The rendered moe kernel (and the rest of the build's Triton kernels) under the interpreter, chunked."""
    model_type, overrides = CASES[case]
    build = str(tiny_build(model_type, **overrides))
    settings = dict(kv_cache_memory=1 << 22, max_num_batched_tokens=24)
    cpu = LLM(build, backend="cpu", **settings).generate(PROMPTS, GREEDY, use_tqdm=False)
    interp = LLM(build, backend="interpret", **settings).generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in interp] == [o.outputs[0].token_ids for o in cpu]
