"""The rendered Triton kernels, run under the interpreter, give the cpu backend's greedy output token for token."""

import pytest

from pllm import LLM, SamplingParams

PROMPTS = ["Hello, world!", "Paged attention keeps the KV cache in fixed-size blocks " * 2, "a", "def main():"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


CASES = [
    ("llama", {}),
    ("qwen2", {}),
    ("qwen3", {"head_dim": 32}),  # the q/k norm kernel, q width != hidden
    # partial rotary in the RoPE kernel; longrope's table switch past 8 positions, which the short prompts' 10 new
    # tokens cross (a recompute) and the long prompt starts past
    ("phi3", {"partial_rotary_factor": 0.5, "max_position_embeddings": 128, "original_max_position_embeddings": 8,
              "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
                               "long_factor": [2.0, 4.0, 8.0, 16.0]}}),
]


@pytest.mark.parametrize("model_type, overrides", CASES, ids=[m for m, _ in CASES])
def test_interpret_equals_cpu(tiny_build, model_type, overrides):
    build = str(tiny_build(model_type, **overrides))
    # A small token budget splits the long prompt into chunks, so the prefill kernel attends to a cached prefix.
    settings = dict(kv_cache_memory=1 << 22, max_num_batched_tokens=24)
    cpu = LLM(build, backend="cpu", **settings).generate(PROMPTS, GREEDY, use_tqdm=False)
    interp_llm = LLM(build, backend="interpret", **settings)
    interp = interp_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in interp] == [o.outputs[0].token_ids for o in cpu]
    # A prefix-cache hit: the second run of the long prompt starts from cached blocks (longrope models keep no
    # prefix cache: their K/V depend on the sequence length, so the run computes everything again).
    again = interp_llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)[0]
    assert (again.num_cached_tokens > 0) == ("rope_scaling" not in overrides)
    assert again.outputs[0].token_ids == cpu[1].outputs[0].token_ids
