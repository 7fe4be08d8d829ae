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
                    assert list(px) == list(py)  # the same tokens: the prompt's, then the ranked best
                    token = next(iter(py))
                    # fp32 sums in another order (two partial sums, then the all-reduce): not bit for bit
                    assert px[token].logprob == pytest.approx(py[token].logprob, abs=1e-4)
            ex, ey = one.embed(PROMPTS[:2]), two.embed(PROMPTS[:2])
            for x, y in zip(ex, ey, strict=True):
                assert x.outputs.embedding == pytest.approx(y.outputs.embedding, abs=1e-5)


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


SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
# text that repeats, so the n-gram lookup finds copies to guess from
SPEC_PROMPTS = [
    "Paged attention keeps the KV cache in fixed-size blocks. Paged attention keeps the KV cache in",
    "Hello, world! The quick brown fox jumps over the lazy dog. Hello, world! The quick",
    "Bonjour le monde. " * 6,
]


def test_speculation_over_two_ranks_gives_the_single_rank_tokens_without_it(tiny_build, tiny_tp_build):
    """Verify steps over two ranks: every rank computes the guesses' rows (their tokens and scored rows travel in
    the step's payload) and runs the same LM-head gather; rank 0 verifies. Greedy fp32 tokens, free and under a
    grammar, equal one rank decoding one token a step."""
    from pllm.runtime.engine.sampling_params import StructuredOutputsParams

    free = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["ab", "b c"]},
                                                        "maxItems": 5}, "ok": {"type": "boolean"}},
              "required": ["tags", "ok"]}
    json_params = SamplingParams(temperature=0.0, max_tokens=80,
                                 structured_outputs=StructuredOutputsParams(json=schema))
    prompts = SPEC_PROMPTS * 2
    params = [free] * len(SPEC_PROMPTS) + [json_params] * len(SPEC_PROMPTS)
    one = LLM(str(tiny_build("llama")), backend="cpu")
    expected = [o.outputs[0].token_ids for o in one.generate(prompts, params, use_tqdm=False)]
    with LLM(str(tiny_tp_build("llama", 2)), backend="cpu", tensor_parallel_size=2, speculative_config=SPEC) as two:
        got = [o.outputs[0].token_ids for o in two.generate(prompts, params, use_tqdm=False)]
        stats = two.engine.scheduler.spec_stats
        assert got == expected
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens, vars(stats)
        # a seeded sampled request is reproducible over two ranks too (rank 0 alone draws)
        seeded = SamplingParams(temperature=0.5, seed=3, max_tokens=30, ignore_eos=True)
        first = [o.outputs[0].token_ids for o in two.generate(SPEC_PROMPTS, seeded, use_tqdm=False)]
        assert [o.outputs[0].token_ids for o in two.generate(SPEC_PROMPTS, seeded, use_tqdm=False)] == first


def test_a_verify_step_crosses_the_wire_whole():
    """A step verifying guesses beside a prompt chunk: the guessed tokens (the tail of the sequence's input ids,
    at their positions and KV slots) and each scored row arrive at a worker as rank 0 prepared them, through the
    fixed int64 header and one int64 payload."""
    import torch

    from pllm.runtime.engine.sampling_params import SamplingParams as Params
    from pllm.runtime.worker.parallel.wire import HEADER_BYTES, Header, decode, encode
    from pllm.runtime.worker.step import DraftInputs, GroupBlockTable, SampleInputs, SeqStep, StepBatch
    from pllm.runtime.worker.step_inputs import prepare_step

    def row(rid: str) -> SampleInputs:
        return SampleInputs(0, Params(temperature=0.0), (), (), frozenset())

    drafts = (7, 8, 9)
    verify = SeqStep("a", (5, *drafts), 17, (GroupBlockTable(0, (3, 4)), GroupBlockTable(1, (6,))), True, 18,
                     sample=row("a"), draft=DraftInputs(drafts, (row("a"),) * 4))
    chunk = SeqStep("b", (1, 2, 3, 4, 5), 0, (GroupBlockTable(0, (1,)), GroupBlockTable(0, (2,))), True, 5,
                    sample=row("b"))
    inputs = prepare_step(StepBatch((verify, chunk)), 16, (0, 0), torch.device("cpu"))
    header, payload = encode(inputs)
    wire = header.to_bytes()
    assert len(wire) == HEADER_BYTES and payload.dtype == torch.int64
    got = decode(Header.from_bytes(wire), payload.clone())
    assert got.input_ids.tolist() == [5, 7, 8, 9, 1, 2, 3, 4, 5]
    assert got.sample_indices.tolist() == [0, 1, 2, 3, 8]  # the verify step's 4 scored rows, the chunk's last
    assert got.meta.positions.tolist() == list(range(17, 21)) + list(range(5))
    for a, b in zip(inputs.metas, got.metas, strict=True):
        assert a.slot_mapping.equal(b.slot_mapping) and a.block_tables.equal(b.block_tables)
        assert (a.query_lens_host, a.seq_lens_host, a.max_query_len) == (b.query_lens_host, b.seq_lens_host,
                                                                          b.max_query_len) == ((4, 5), (21, 5), 5)
