"""Speculative decoding by n-gram lookup: greedy output is the same with it on and off, under batching, chunked
prefill, preemption and prefix hits; drafts are both accepted and rejected; stops inside an accepted run cut it."""

import pytest

from pllm import LLM, SamplingParams
from pllm.runtime.engine.config import EngineConfig, SpeculativeConfig

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
# text that repeats, so the lookup finds earlier copies, and the random tiny model's loops, which it copies too
PROMPTS = [
    "Paged attention keeps the KV cache in fixed-size blocks. Paged attention keeps the KV cache in",
    "Hello, world! The quick brown fox jumps over the lazy dog. Hello, world! The quick",
    "def main():\n    return 42  # numbers 0123456789\ndef main():\n    return",
    "Bonjour le monde. " * 6,
    "a",
    "numbers 0123456789 numbers 01234",
]


@pytest.fixture(scope="module")
def reference(plain):
    """Each prompt alone without speculation: what every run below must output."""
    return [plain.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def _pool_is_full(llm: LLM) -> bool:
    return llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_greedy_batched_equals_no_speculation_and_drafts_are_accepted_and_rejected(build, reference):
    llm = LLM(build, backend="cpu", kv_cache_memory=1 << 24, speculative_config=SPEC)
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    stats = llm.engine.scheduler.spec_stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens, vars(stats)
    assert _pool_is_full(llm)
    snap = llm.engine.snapshot()
    assert (snap.spec_decode_num_draft_tokens, snap.spec_decode_num_accepted_tokens) == (
        stats.num_draft_tokens, stats.num_accepted_tokens)


def test_greedy_alone_each_equals_no_speculation(build, reference):
    llm = LLM(build, backend="cpu", kv_cache_memory=1 << 24, speculative_config=SPEC)
    assert [llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS] == reference


@pytest.mark.parametrize("k", [1, 7])
def test_chunked_prefill_preemption_and_prefix_hits_with_speculation(build, reference, k):
    # 12 blocks of 16 tokens for 6 requests of up to ~70 tokens, 16 tokens a step: chunks, preemptions, hits
    kv_bytes_per_block = 2 * 2 * 16 * 2 * 16 * 4  # k+v, layers, block, kv heads, head_dim, fp32
    spec = dict(SPEC, num_speculative_tokens=k)
    llm = LLM(build, backend="cpu", kv_cache_memory=12 * kv_bytes_per_block, max_num_batched_tokens=16,
              max_num_seqs=6, speculative_config=spec)
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.scheduler.spec_stats.num_accepted_tokens > 0
    assert _pool_is_full(llm)
    for _ in range(2):  # the second run starts from the first's cached prompt and output blocks
        again = llm.generate(PROMPTS[3], GREEDY, use_tqdm=False)
        assert _tokens(again) == reference[3:4]
    assert again[0].num_cached_tokens > 0
    assert _pool_is_full(llm)


def test_stops_inside_an_accepted_run(build, plain, reference):
    llm = LLM(build, backend="cpu", kv_cache_memory=1 << 24, speculative_config=SPEC)
    prompt, ref = PROMPTS[0], reference[0]
    for cut in (3, 9, 17):
        stop_id = ref[cut]
        params = SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[stop_id])
        want = plain.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason == "stop"
        for max_tokens in (cut, cut + 1):
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
            assert got.token_ids == ref[:max_tokens] and got.finish_reason == "length"
    text = plain.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].text
    for stop in (text[5:9], text[20:23]):
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop], logprobs=2)
        want = plain.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == (
            want.text, want.token_ids, want.finish_reason, want.stop_reason)
        assert len(got.logprobs) == len(got.token_ids)
        assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-4)
    assert _pool_is_full(llm)


def test_logprobs_are_the_targets(build, plain):
    llm = LLM(build, backend="cpu", kv_cache_memory=1 << 24, speculative_config=SPEC)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=3)
    want = plain.generate(PROMPTS[:3], params, use_tqdm=False)
    got = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    for w, g in zip(want, got):
        w, g = w.outputs[0], g.outputs[0]
        assert g.token_ids == w.token_ids and len(g.logprobs) == len(w.logprobs) == len(w.token_ids)
        for t, a, b in zip(w.token_ids, g.logprobs, w.logprobs):
            assert list(a) == list(b) and next(iter(a)) == t  # the same tokens, the sampled first
            assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4) and a[t].rank == b[t].rank


def test_penalties_and_min_tokens_follow_the_guesses(build, plain):
    llm = LLM(build, backend="cpu", kv_cache_memory=1 << 24, speculative_config=SPEC)
    eos = llm.engine.eos_token_ids[0]
    params = [
        SamplingParams(temperature=0.0, max_tokens=30, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, max_tokens=30, frequency_penalty=0.5, presence_penalty=0.2),
        SamplingParams(temperature=0.0, max_tokens=30, min_tokens=12, logit_bias={eos: 30.0}),
    ]
    for p in params:
        want = _tokens(plain.generate(PROMPTS, p, use_tqdm=False))
        assert _tokens(llm.generate(PROMPTS, p, use_tqdm=False)) == want, p


def test_seeded_sampling_equals_no_speculation_whatever_the_batch_and_budget(build, plain):
    """A seeded request's draw at each output index is keyed by that index: its tokens are those without
    speculation, alone, batched, with n > 1, and when a small step budget and a small pool cut its guesses."""
    # a low temperature: the random model's distributions are flat, and its guesses are then never accepted
    params = SamplingParams(temperature=0.1, top_p=0.9, max_tokens=30, seed=7, ignore_eos=True, n=2)
    want = [[c.token_ids for c in o.outputs] for o in plain.generate(PROMPTS, params, use_tqdm=False)]
    llm = LLM(build, backend="cpu", kv_cache_memory=1 << 24, speculative_config=SPEC)
    assert [[c.token_ids for c in o.outputs] for o in llm.generate(PROMPTS, params, use_tqdm=False)] == want
    assert [[c.token_ids for c in llm.generate([p], params, use_tqdm=False)[0].outputs] for p in PROMPTS] == want
    stats = llm.engine.scheduler.spec_stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    kv_bytes_per_block = 2 * 2 * 16 * 2 * 16 * 4  # k+v, layers, block, kv heads, head_dim, fp32
    tight = LLM(build, backend="cpu", kv_cache_memory=12 * kv_bytes_per_block, max_num_batched_tokens=16,
                max_num_seqs=6, speculative_config=dict(SPEC, num_speculative_tokens=7))
    greedy_beside = [GREEDY] * len(PROMPTS)
    outs = tight.generate(PROMPTS + PROMPTS, [params] * len(PROMPTS) + greedy_beside, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in outs[: len(PROMPTS)]] == want
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.scheduler.spec_stats.num_accepted_tokens > 0


def test_config_errors_name_the_setting():
    assert EngineConfig(speculative_config=SPEC).speculative_config == SpeculativeConfig(
        num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=1)
    assert SpeculativeConfig(num_speculative_tokens=2).prompt_lookup_min == 5
    assert SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_max=3).prompt_lookup_min == 3
    cases = [
        ({"method": "eagle", "num_speculative_tokens": 2}, "method='eagle'"),
        ({"method": "ngram"}, "num_speculative_tokens is required"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens=0"),
        ({"num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup_min=4"),
        ({"num_speculative_tokens": 2, "prompt_lookup_max": -1}, "prompt_lookup_max=-1"),
        ({"num_speculative_tokens": 2, "model": "x"}, "unknown key(s) 'model'"),
        ("ngram", "must be a dict"),
    ]
    for value, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            EngineConfig(speculative_config=value)


@pytest.mark.parametrize("model_type, overrides", [("mistral", {"sliding_window": 6}), ("gemma3_text", {})])
def test_windowed_models_equal_no_speculation(tiny_build, model_type, overrides):
    """Rolled-back drafts and the blocks a window returns, in one windowed group (mistral) and in a global group
    beside a windowed one (gemma3), chunked through a small cache."""
    build = str(tiny_build(model_type, **overrides))
    small = dict(backend="cpu", kv_cache_memory=1 << 18, max_num_batched_tokens=16, max_num_seqs=4)
    want = _tokens(LLM(build, **small).generate(PROMPTS, GREEDY, use_tqdm=False))
    llm = LLM(build, **small, speculative_config=SPEC)
    assert any(m.group.window is not None for m in llm.engine.kv.managers)
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == want
    assert llm.engine.scheduler.spec_stats.num_accepted_tokens > 0
    assert _pool_is_full(llm)


def test_lora_and_base_sequences_share_verify_steps(build, tiny_loras):
    from pllm.runtime.engine.lora import LoRARequest

    loras = [LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(tiny_loras.items())]
    per_prompt = [loras[i % len(loras)] if i % 2 else None for i in range(len(PROMPTS))]
    want = _tokens(LLM(build, backend="cpu", kv_cache_memory=1 << 24).generate(
        PROMPTS, GREEDY, use_tqdm=False, lora_request=per_prompt))
    llm = LLM(build, backend="cpu", kv_cache_memory=1 << 24, speculative_config=SPEC)
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=per_prompt)) == want
    assert llm.engine.scheduler.spec_stats.num_accepted_tokens > 0


def test_longrope_models_refuse_speculation(tiny_build):
    longrope = {  # Phi-3 128k's scaling, tiny (tests/models/test_hf_equivalence.py's PHI3_LONGROPE)
        "partial_rotary_factor": 0.5, "max_position_embeddings": 128, "original_max_position_embeddings": 16,
        "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
                         "long_factor": [2.0, 4.0, 8.0, 16.0]},
    }
    build = str(tiny_build("phi3", **longrope))
    with pytest.raises(ValueError, match="speculative_config: not supported for this model"):
        LLM(build, backend="cpu", kv_cache_memory=1 << 22, speculative_config=SPEC)


def test_interpret_backend_verifies_the_same(build, reference):
    """The rendered Triton kernels (interpreted) compute a verify step's rows over cached K/V as the cpu ops do."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm = LLM(build, backend="interpret", kv_cache_memory=1 << 22, speculative_config=SPEC)
    outs = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    assert _tokens(outs) == [r[:12] for r in reference[:2]]
    assert llm.engine.scheduler.spec_stats.num_accepted_tokens > 0
