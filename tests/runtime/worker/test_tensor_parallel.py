"""LLM(build, tensor_parallel_size=2) over gloo on the cpu: the same greedy tokens as one process, the wrong N
refused, and a killed worker taking the engine down at once with a clear error."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from pllm.runtime.engine.llm import LLM
from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.worker.parallel.group import WorkerDied

PROMPTS = ["Hello, world! The quick", "Paged attention keeps", "def main():\n    return", "Bonjour le"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)

CASES = {
    "llama": ("llama", {}),
    "qwen2-bias": ("qwen2", {}),  # q, k and v carry biases: the bias rows split with their heads
    "gqa-replicated-kv": ("llama", {"num_key_value_heads": 1}),  # one KV head, two ranks: replicated
    "mixtral": ("mixtral", MOE),  # experts split on their intermediate dim
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                    tie_word_embeddings=True)),
}


def _tokens(llm: LLM, params: SamplingParams = GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_single_rank_tokens(case, tiny_build, tiny_tp_build):
    model_type, overrides = CASES[case]
    one = LLM(str(tiny_build(model_type, **overrides)), backend="cpu")
    expected = _tokens(one)
    with LLM(str(tiny_tp_build(model_type, 2, **overrides)), backend="cpu", tensor_parallel_size=2) as two:
        assert _tokens(two) == expected
        if case == "llama":  # the LM head's other passes: prompt logprobs, and a decoder embedding (pooling)
            params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3, logprobs=2)
            a, b = (llm.generate(PROMPTS, params, use_tqdm=False) for llm in (one, two))
            for x, y in zip(a, b, strict=True):
                assert x.outputs[0].token_ids == y.outputs[0].token_ids
                for px, py in zip(x.prompt_logprobs[1:], y.prompt_logprobs[1:], strict=True):
                    assert [t for t, _ in px.top] == [t for t, _ in py.top]  # the same ranked tokens
                    # fp32 sums in another order (two partial sums, then the all-reduce): not bit for bit
                    assert px.logprob == pytest.approx(py.logprob, abs=1e-4)
            ex, ey = one.embed(PROMPTS[:2]), two.embed(PROMPTS[:2])
            for x, y in zip(ex, ey, strict=True):
                assert x.embedding == pytest.approx(y.embedding, abs=1e-5)


def test_a_build_for_two_ranks_refuses_one_and_the_reverse(tiny_build, tiny_tp_build):
    with pytest.raises(ValueError, match="built for tensor_parallel_size=2, but the engine setting is "
                                         "tensor_parallel_size=1"):
        LLM(str(tiny_tp_build("llama", 2)), backend="cpu")
    with pytest.raises(ValueError, match="built for tensor_parallel_size=1, but the engine setting is "
                                         "tensor_parallel_size=2"):
        LLM(str(tiny_build("llama")), backend="cpu", tensor_parallel_size=2)


def test_lora_modules_are_refused_with_tensor_parallelism():
    with pytest.raises(ValueError, match="lora_modules"):
        LLM("unused", tensor_parallel_size=2, lora_modules=(("a", "/nowhere"),))


def test_a_killed_worker_fails_the_engine_within_seconds(tiny_tp_build):
    llm = LLM(str(tiny_tp_build("llama", 2)), backend="cpu", tensor_parallel_size=2)
    try:
        worker = llm.engine.runner.workers[0]
        long = SamplingParams(temperature=0.0, max_tokens=450, ignore_eos=True)
        threading.Timer(0.5, os.kill, (worker.pid, signal.SIGKILL)).start()  # mid-generation
        start = time.monotonic()
        with pytest.raises(WorkerDied, match=rf"worker rank 1 \(pid {worker.pid}\) exited with code -9"):
            llm.generate(PROMPTS * 4, long, use_tqdm=False)
        assert time.monotonic() - start < 20  # not the collective timeout: the peer's exit is seen at once
        with pytest.raises(WorkerDied):  # and stays dead
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    finally:
        llm.close()
    assert not worker.is_alive()


def test_a_worker_that_cannot_start_is_named_with_its_error(tiny_tp_build, tmp_path):
    import shutil

    build = tmp_path / "build"
    shutil.copytree(tiny_tp_build("llama", 2), build)
    shard = build / "model-rank1.safetensors"  # only rank 1 reads (and hashes) it
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(WorkerDied, match=r"worker rank 1 .* exited with code 1 \(BuildDirError: .*model-rank1"
                                         r"\.safetensors: sha256 does not match"):
        LLM(str(build), backend="cpu", tensor_parallel_size=2)


@pytest.mark.parametrize("size", [0, -2, True, "2"])
def test_tensor_parallel_size_setting_must_be_a_positive_integer(size):
    from pllm.runtime.engine.config import EngineConfig

    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=size)
