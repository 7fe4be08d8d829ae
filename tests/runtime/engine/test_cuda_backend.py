"""The cuda backend against the cpu backend on one tiny float32 build: the same greedy tokens, request for request.

float32 keeps both sides exact enough for greedy choices to agree (the rendered kernels' dots run in ieee precision,
and PyTorch leaves tf32 off): a difference means a kernel computes something else on the GPU than on the CPU.
"""

import pytest
import torch

from pllm import LLM, SamplingParams

PROMPTS = ["Hello, world!", "a", "def main():", "Paged attention keeps the KV cache in blocks. " * 6, "1 2 3"]
SETTINGS = dict(kv_cache_memory=1 << 22, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_greedy_equals_cpu_greedy(tiny_build):
    build = str(tiny_build("llama", dtype="float32"))
    # max_num_batched_tokens=32 chunks the long prompt's prefill; the lengths differ so the decode batch shrinks
    params = [SamplingParams(temperature=0.0, max_tokens=10 + 3 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    expected = LLM(build, backend="cpu", **SETTINGS).generate(PROMPTS, params, use_tqdm=False)
    got = LLM(build, backend="cuda", **SETTINGS).generate(PROMPTS, params, use_tqdm=False)
    for prompt, g, e in zip(PROMPTS, got, expected):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids, f"cuda and cpu differ on {prompt!r}"
