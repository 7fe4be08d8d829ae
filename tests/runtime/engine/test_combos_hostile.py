"""Feature combinations under stress: every request of a mixed batch (prompt and sample logprobs, LoRA adapters and
the base, structured output, n > 1, seeds, stop strings and ids) outputs what it does alone on a plain engine, when
prompts are chunked, requests preempted, prefixes cached (across adapters) and drafts speculated; the pool is full
again after."""

from __future__ import annotations

import dataclasses

import pytest

from pllm import LLM, SamplingParams, StructuredOutputsParams
from pllm.runtime.engine.lora import LoRARequest

TOL = 1e-4  # fp32, the same build: batched rows differ from lone ones by a few ulps
KV_BYTES_PER_BLOCK = 2 * 2 * 16 * 2 * 16 * 4  # k+v, 2 layers, 16-token block, 2 kv heads, head_dim 16, fp32
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
SHARED = "Paged attention keeps the KV cache in fixed-size blocks. Paged attention keeps the KV cache in"
PROMPTS = [
    SHARED,
    SHARED + " pages, and",
    "Hello, world! The quick brown fox jumps over the lazy dog. Hello, world! The quick",
    "Bonjour le monde. " * 5,
]
REGEX = r"(ab|ba|abc){1,8}(-[0-9]{1,3}){0,6};"


@pytest.fixture(scope="module")
def loras(tiny_loras):
    return {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(tiny_loras.items())}


@pytest.fixture(scope="module")
def alone(build):
    """No chunking, no preemption, no prefix cache, no speculation: the reference, one request at a time."""
    return LLM(build, backend="cpu", kv_cache_memory=1 << 24, enable_prefix_caching=False)


def _workload(loras) -> list[tuple[str, SamplingParams, LoRARequest | None]]:
    """(prompt, params, adapter) for each request: every feature, several at once, across adapters and the base."""
    g = dict(temperature=0.0, max_tokens=24, ignore_eos=True)
    a, b, c = loras["alpha"], loras["beta"], loras["gamma"]
    items = []
    for lora in (None, a, b):
        for p in PROMPTS[:2]:
            items.append((p, SamplingParams(**g, logprobs=3, prompt_logprobs=2), lora))
            items.append((p, SamplingParams(**g), lora))
    items += [
        (PROMPTS[2], SamplingParams(temperature=1.0, seed=11, n=3, max_tokens=20, logprobs=2, ignore_eos=True), c),
        (PROMPTS[2], SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=20, logprobs=1), None),
        (PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=40, stop=["monde"], logprobs=1), a),
        (PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=40, stop=["e"], include_stop_str_in_output=True), None),
        (PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=120, prompt_logprobs=1, logprobs=1,
                                    structured_outputs=StructuredOutputsParams(regex=REGEX)), b),
        (PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=120, n=2, seed=3,
                                    structured_outputs=StructuredOutputsParams(regex=REGEX)), None),
    ]
    return items


def _stop_token_items(alone, loras):
    """Requests stopping on a token the model does output (read from a first run alone)."""
    out = alone.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                         use_tqdm=False, lora_request=loras["beta"])[0].outputs[0].token_ids
    stop = out[7]
    return [(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop],
                                        logprobs=2, prompt_logprobs=0), loras["beta"])]


def _assert_logprobs_close(got, want, where) -> None:
    if want is None:
        assert got is None, where
        return
    assert got is not None and len(got) == len(want), where
    for i, (x, y) in enumerate(zip(got, want, strict=True)):
        if y is None:
            assert x is None, (where, i)
            continue
        assert list(x) == list(y), (where, i)  # the same tokens in the same order, the scored one first
        for t in y:
            assert abs(x[t].logprob - y[t].logprob) < TOL, (where, i, t, x[t].logprob, y[t].logprob)
            assert x[t].decoded_token == y[t].decoded_token, (where, i, t)


def _assert_same(got, want, where) -> None:
    assert got.prompt_token_ids == want.prompt_token_ids, where
    _assert_logprobs_close(got.prompt_logprobs, want.prompt_logprobs, (where, "prompt"))
    assert len(got.outputs) == len(want.outputs), where
    for x, y in zip(got.outputs, want.outputs, strict=True):
        w = (where, x.index)
        assert x.token_ids == y.token_ids, w
        assert (x.text, x.finish_reason, x.stop_reason) == (y.text, y.finish_reason, y.stop_reason), w
        _assert_logprobs_close(x.logprobs, y.logprobs, w)


def _run_and_compare(llm, alone, items) -> None:
    prompts, params, adapters = zip(*items, strict=True)
    outs = llm.generate(list(prompts), list(params), use_tqdm=False, lora_request=list(adapters))
    for i, (out, (p, sp, lora)) in enumerate(zip(outs, items, strict=True)):
        ref = alone.generate(p, sp, use_tqdm=False, lora_request=lora)[0]
        _assert_same(out, ref, (i, lora.name if lora else None, sp))
    kv = llm.engine.kv
    assert kv.num_free_blocks == kv.num_blocks
    assert not llm.engine.has_unfinished() and llm.engine.num_unfinished_requests() == 0


STRESS = {
    "chunked": dict(max_num_batched_tokens=16),
    "preempted": dict(kv_cache_memory=14 * KV_BYTES_PER_BLOCK, max_num_batched_tokens=32, max_num_seqs=8),
    "speculative": dict(speculative_config=SPEC),
    "all": dict(kv_cache_memory=14 * KV_BYTES_PER_BLOCK, max_num_batched_tokens=16, max_num_seqs=8,
                speculative_config=SPEC),
}


@pytest.mark.parametrize("stress", list(STRESS))
def test_mixed_batch_equals_each_request_alone(build, alone, loras, stress):
    settings = dict(backend="cpu", kv_cache_memory=1 << 24) | STRESS[stress]
    llm = LLM(build, **settings)
    items = _workload(loras) + _stop_token_items(alone, loras)
    _run_and_compare(llm, alone, items)
    if "kv_cache_memory" in STRESS[stress]:
        assert llm.engine.scheduler.num_preemptions > 0
    if "speculative_config" in STRESS[stress]:
        stats = llm.engine.scheduler.spec_stats
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    # twice: the second run finds every prefix cached (each under its own adapter)
    hits = llm.engine.kv.num_prefix_hits
    _run_and_compare(llm, alone, items)
    assert llm.engine.kv.num_prefix_hits > hits


def test_a_refused_sequence_of_n_leaves_no_orphan(build):
    """n = 2 whose second sequence's id ("y#1") is already taken: the request is refused whole, naming the id, and
    its first sequence is not left running with no output to go to (which broke the engine's request counts)."""
    llm = LLM(build, backend="cpu", kv_cache_memory=1 << 24)
    engine = llm.engine
    engine.add_request("y#1", "Hello there", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="'y#1'"):
        engine.add_request("y", "Hello there friend", SamplingParams(max_tokens=2, n=2))
    assert engine.scheduler.get_request("y#0") is None
    assert engine.num_requests() == (0, 1)
    while engine.has_unfinished():
        engine.step()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and engine.num_unfinished_requests() == 0


@pytest.mark.parametrize("spec", [None, SPEC])
def test_stop_strings_wait_for_min_tokens(build, alone, spec):
    """As vLLM's (PR 22014): a stop string counts only where it ends in the text of an output token past the first
    min_tokens; EOS and stop ids are held back by the sampler, stop strings by the output processor. With and
    without speculation (a stop string inside an accepted run of guesses)."""
    prompt = "Bonjour le monde. " * 3
    free = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    full = alone.generate(prompt, free, use_tqdm=False)[0].outputs[0]
    texts = [alone.generate(prompt, dataclasses.replace(free, max_tokens=k), use_tqdm=False)[0].outputs[0].text
             for k in range(1, 41)]  # texts[k - 1]: the text of the first k output tokens
    min_tokens = 5
    offset = len(texts[min_tokens - 1])  # a hit must end past the text of the first min_tokens tokens
    # a letter in the first min_tokens tokens' text that shows up again after it
    stop = next(c for c in texts[min_tokens - 1] if c.isalpha() and full.text.find(c, offset) >= 0)
    cut = full.text.find(stop, offset - len(stop) + 1)
    num_tokens = next(k for k in range(1, 41) if len(texts[k - 1]) > cut)  # the token whose text completes it
    llm = LLM(build, backend="cpu", kv_cache_memory=1 << 24, speculative_config=spec)
    out = llm.generate(prompt, dataclasses.replace(free, stop=[stop], min_tokens=min_tokens), use_tqdm=False)[0]
    got = out.outputs[0]
    assert (got.text, got.finish_reason, got.stop_reason) == (full.text[:cut], "stop", stop)
    assert got.token_ids == full.token_ids[:num_tokens]
    assert len(got.token_ids) > min_tokens
    # without min_tokens the first occurrence stops it, before min_tokens tokens are out
    early = llm.generate(prompt, dataclasses.replace(free, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert len(early.token_ids) <= min_tokens and early.text == full.text[: full.text.find(stop)]


def test_stop_string_matcher_never_ends_a_hit_in_text_fed_before_min_tokens():
    from pllm.runtime.engine.detokenizer import StopStringMatcher

    m = StopStringMatcher(("ab", "xaby"), False)
    assert m.feed("zxab", can_stop=False) == ("z", False)  # "xab" held: it may grow into "xaby"
    assert m.feed("", can_stop=True) == ("", False)  # the "ab" inside ended before min_tokens: no hit, then or later
    assert m.feed("q") == ("xabq", False)
    assert m.feed("ab") == ("", True) and m.stop_string == "ab"
    m = StopStringMatcher(("ab", "xaby"), True)
    assert m.feed("zxa", can_stop=False) == ("z", False)
    assert m.feed("b") == ("xab", True)  # starts before, ends after: a hit (vLLM's rule)


@pytest.mark.parametrize("bad", ["alpha", {"name": "alpha"}, ("alpha", 1, "/x"), ["alpha"]])
def test_a_lora_request_of_the_wrong_type_is_named(build, bad):
    """A name, a dict or a tuple where a LoRARequest belongs: a ValueError saying so, not a count of its characters
    or an AttributeError, and nothing queued."""
    llm = LLM(build, backend="cpu", kv_cache_memory=1 << 24)
    with pytest.raises(ValueError, match="LoRARequest"):
        llm.generate(["hi"], SamplingParams(max_tokens=2), use_tqdm=False, lora_request=bad)
    assert llm.engine.num_unfinished_requests() == 0 and not llm.engine.loras.adapters
