"""The engine end to end on a tiny model: batching, preemption, chunked prefill and prefix hits change nothing."""

import math

import pytest
import torch

from pllm import LLM, SamplingParams
from pllm.compiler.spec import MAX_POSITION_EMBEDDINGS
from pllm.runtime.engine.request import Request, ScheduledBatch, ScheduledSeq
from pllm.runtime.worker.model_runner import BackendUnavailable

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = [
    "Hello, world!",
    "Paged attention keeps the KV cache in fixed-size blocks, and the scheduler " * 3,
    "Grüße aus Köln. こんにちは世界. 你好",
    "def main():\n    return 42",
    "The quick brown fox",
    "a",
    "Bonjour le monde. " * 8,
    "numbers 0123456789 " * 4,
]


@pytest.fixture(scope="module")
def alone(plain):
    """Each prompt run by itself, with room to spare: the reference for every batched run."""
    return [plain.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]


def _pool_is_full(llm: LLM) -> bool:
    return llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_batched_equals_alone(plain, alone):
    outs = plain.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert [o.prompt for o in outs] == PROMPTS  # input order kept
    assert _pool_is_full(plain)


def test_chunked_prefill_and_preemption_equal_alone(build, alone):
    # 12 blocks of 16 tokens for 8 requests of up to ~90 tokens: they cannot all stay resident.
    kv_bytes_per_block = 2 * 2 * 16 * 2 * 16 * 4  # k+v, layers, block, kv heads, head_dim, fp32
    llm = LLM(build, backend="cpu", kv_cache_memory=12 * kv_bytes_per_block, max_num_batched_tokens=16, max_num_seqs=6)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert llm.engine.scheduler.num_preemptions > 0
    assert _pool_is_full(llm)


def test_prefix_cache_hit_gives_same_output(build):
    llm = LLM(build, backend="cpu", kv_cache_memory=1 << 24)
    prompt = PROMPTS[1]
    first = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    second = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens >= 16
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    no_cache = LLM(build, backend="cpu", kv_cache_memory=1 << 24, enable_prefix_caching=False)
    again = no_cache.generate([prompt, prompt], GREEDY, use_tqdm=False)
    assert all(o.num_cached_tokens == 0 and o.outputs[0].token_ids == first.outputs[0].token_ids for o in again)


def test_token_id_prompts_and_finish_reasons(plain, alone):
    ids = plain.tokenizer(PROMPTS[0]).input_ids
    out = plain.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == alone[0] and out.outputs[0].finish_reason == "length"
    assert out.prompt is None and out.prompt_token_ids == ids
    stop_id = alone[0][4]
    cut = alone[0].index(stop_id) + 1
    out = plain.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id]),
                         use_tqdm=False)[0]
    assert out.outputs[0].token_ids == alone[0][:cut]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_id


def test_stop_string_cuts_text(plain):
    full = plain.generate([PROMPTS[3]], GREEDY, use_tqdm=False)[0].outputs[0].text
    assert len(full) > 8
    stop = full[4:7]
    cut = full.index(stop)
    out = plain.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=24, stop=[stop]), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.text == full[:cut] and c.finish_reason == "stop" and c.stop_reason == stop
    out = plain.generate(
        [PROMPTS[3]], SamplingParams(temperature=0, max_tokens=24, stop=stop, include_stop_str_in_output=True),
        use_tqdm=False,
    )[0]
    assert out.outputs[0].text == full[: cut + len(stop)]


def test_a_stop_string_on_the_last_allowed_token_finishes_with_stop(plain):
    """A stop string that the max_tokens-th token completes ends the output as a stop string does anywhere else:
    finish_reason stop, not length (vLLM's rule; a stop token on that token already did so)."""
    for n in range(6, 24):
        shorter = plain.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=n - 1, ignore_eos=True),
                                 use_tqdm=False)[0].outputs[0].text
        full = plain.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0].text
        last = full[len(shorter):]  # what the n-th token added
        if last.strip() and "\ufffd" not in last and full.index(last) == len(shorter):
            break
    else:
        pytest.skip("no token whose text is new and whole in this model's output")
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, stop=[last])
    c = plain.generate([PROMPTS[3]], params, use_tqdm=False)[0].outputs[0]
    assert c.text == shorter and c.finish_reason == "stop" and c.stop_reason == last, (c.text, c.finish_reason)


def test_seeded_sampling_reproducible_and_n(plain):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, n=3)
    a = plain.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    crowd = plain.generate([PROMPTS[2], PROMPTS[0], PROMPTS[4]], [GREEDY, params, params], use_tqdm=False)
    assert len(a.outputs) == 3 and [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in crowd[1].outputs] == [o.token_ids for o in a.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1  # seed + index: distinct samples


def test_logprobs(plain):
    out = plain.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=6, logprobs=3), use_tqdm=False)[0]
    c = out.outputs[0]
    assert len(c.logprobs) == 6
    for token_id, lp in zip(c.token_ids, c.logprobs):
        assert next(iter(lp)) == token_id and len(lp) == 3  # greedy picks the most likely token: one of the top 3
        assert lp[token_id].rank == 1 and lp[token_id].logprob <= 0
        assert [e.rank for e in lp.values()] == [1, 2, 3]
    assert math.isclose(c.cumulative_logprob, sum(lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)),
                        rel_tol=1e-6)


def test_embed(plain):
    a, b, a2 = (o.outputs for o in plain.embed(["the quick brown fox", "paged attention", "the quick brown fox"]))
    va, vb = torch.tensor(a.embedding), torch.tensor(b.embedding)
    assert va.shape == (64,) and math.isclose(va.norm().item(), 1.0, rel_tol=1e-5)
    assert a.embedding == a2.embedding and not torch.allclose(va, vb)
    mean = plain.embed("the quick brown fox", pooling="mean")[0].outputs
    assert not torch.allclose(torch.tensor(mean.embedding), va)
    assert _pool_is_full(plain)


def test_bad_input_errors(build, plain):
    with pytest.raises(ValueError, match=r"maximum context length is 64 tokens.*contains 70 input tokens"):
        LLM(build, backend="cpu", max_model_len=64, kv_cache_memory=1 << 22).generate(
            [{"prompt_token_ids": [5] * 70}], use_tqdm=False
        )
    with pytest.raises(ValueError, match="outside the vocabulary"):
        plain.generate([{"prompt_token_ids": [1, 10**6]}], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt is empty"):
        plain.generate([""], use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_model_len=100000.*max_position_embeddings=512"):
        LLM(build, backend="cpu", max_model_len=100000)
    with pytest.raises(TypeError, match="unknown engine setting.*max_num_seq\\b"):
        LLM(build, max_num_seq=3)
    with pytest.raises(ValueError, match="backend='tpu'"):
        LLM(build, backend="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA"):
            LLM(build, backend="cuda")
    assert _pool_is_full(plain) and not plain.engine.has_unfinished()


def test_abort_frees_blocks_at_once(plain):
    engine = plain.engine
    engine.add_request("x", PROMPTS[1], SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    assert engine.kv.num_free_blocks < engine.kv.num_blocks
    engine.abort_request("x")
    assert _pool_is_full(plain) and not engine.has_unfinished()


def test_request_counts_treat_n_as_one_request(build):
    llm = LLM(build, backend="cpu", kv_cache_memory=1 << 24, max_num_seqs=4)
    engine = llm.engine
    engine.add_request("fan", PROMPTS[0], SamplingParams(n=3, max_tokens=8, ignore_eos=True))
    engine.add_request("one", PROMPTS[4], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.add_request("late", PROMPTS[5], SamplingParams(n=2, max_tokens=8, ignore_eos=True))
    assert engine.num_requests() == (0, 3)  # six sequences, three requests
    engine.step()  # max_num_seqs=4: the fan-out and "one" run, "late" waits
    assert engine.scheduler.num_running == 4 and engine.num_requests() == (2, 1)
    while engine.has_unfinished():
        engine.step()
    assert engine.num_requests() == (0, 0)


def test_embed_batched_and_chunked_agree(build, plain):
    texts = [PROMPTS[1], "a", PROMPTS[6], PROMPTS[2]]
    together = [o.outputs for o in plain.embed(texts)]
    alone = [plain.embed(t)[0].outputs for t in texts]
    chunked = LLM(build, backend="cpu", kv_cache_memory=1 << 22, max_num_batched_tokens=8).embed(texts, pooling="mean")
    chunked = [o.outputs for o in chunked]
    mean_alone = [plain.embed(t, pooling="mean")[0].outputs for t in texts]
    for a, b in zip(together, alone):
        assert torch.allclose(torch.tensor(a.embedding), torch.tensor(b.embedding), atol=1e-5)
    for a, b in zip(chunked, mean_alone):
        assert a.num_prompt_tokens == b.num_prompt_tokens
        assert torch.allclose(torch.tensor(a.embedding), torch.tensor(b.embedding), atol=1e-5)
    assert _pool_is_full(plain)


def test_python_api_refuses_what_it_cannot_honour(build, plain):
    with pytest.raises(TypeError, match="unknown engine setting.*block_size"):
        LLM(build, backend="cpu", block_size=8)
    with pytest.raises(ValueError, match="max_model_len=True"):
        LLM(build, backend="cpu", max_model_len=True)
    with pytest.raises(ValueError, match="prompt is not valid Unicode.*surrogate"):
        plain.generate("\ud800", use_tqdm=False)
    with pytest.raises(ValueError, match="prompt is not valid Unicode"):
        plain.embed(["fine", "bad \udfff"])
    if plain.tokenizer.chat_template:
        with pytest.raises(ValueError, match="chat messages is not valid Unicode"):
            plain.chat([{"role": "user", "content": "x\ud800"}], use_tqdm=False)
    assert _pool_is_full(plain) and not plain.engine.has_unfinished()


def test_max_model_len_fits_the_kv_cache(build, tiny_build, caplog):
    # 256 KiB holds 32 blocks of 16 tokens (8 KiB each), one kept for the padding rows: 496 tokens < 512
    small = LLM(build, backend="cpu", kv_cache_memory=1 << 18)
    capacity = small.engine.kv.num_blocks * small.engine.kv.block_size
    assert capacity < 512 and small.engine.max_model_len == capacity
    assert small.engine.runner.model.cos_sin.shape[0] == capacity
    assert "max_model_len lowered from the model's 512" in caplog.text
    out = small.generate([{"prompt_token_ids": [5] * 10}], SamplingParams(max_tokens=None, ignore_eos=True),
                         use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == capacity - 10  # a request without max_tokens is served, to the limit
    with pytest.raises(ValueError, match=rf"max_model_len=512: larger than .* KV cache \({capacity}\)"):
        LLM(build, backend="cpu", kv_cache_memory=1 << 18, max_model_len=512)
    # the largest model limit the compiler accepts (2**27 positions: gigabytes of rotary table) costs only what
    # the cache holds: the rotary table follows max_model_len
    absurd = LLM(str(tiny_build("llama", max_position_embeddings=MAX_POSITION_EMBEDDINGS)), backend="cpu",
                 kv_cache_memory=1 << 18)
    assert absurd.engine.max_model_len == capacity
    assert absurd.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_kv_cache_sizes_that_cannot_work_are_named(build):
    with pytest.raises(ValueError, match=r"kv_cache_memory=1000000000000000: more than the \d+ bytes of free cpu"):
        LLM(build, backend="cpu", kv_cache_memory=10**15)
    with pytest.raises(ValueError, match=r"engine setting kv_cache_memory=1024: too small"):
        LLM(build, backend="cpu", kv_cache_memory=1024)
    # a derived budget is not the user's setting: the message says where it came from
    with pytest.raises(ValueError, match=r"KV-cache budget \(\d+ bytes from kv_cache_fraction=1e-09 of free cpu"):
        LLM(build, backend="cpu", kv_cache_fraction=1e-9)


def _synchronous_embedding(llm: LLM, text: str, pooling: str) -> list[float]:
    """The embedding as the engine computed it before embeddings were scheduled: the prompt alone, in chunks
    of max_num_batched_tokens, pooled from the final hidden states."""
    engine = llm.engine
    ids = engine.tokenize(text)[1]
    req = Request("reference", ids, SamplingParams(), 0.0, 1)
    chunk = engine.config.max_num_batched_tokens
    parts = []
    try:
        while req.num_computed_tokens < len(ids):
            num_new = min(chunk, len(ids) - req.num_computed_tokens)
            assert engine.kv.allocate_slots(req, num_new)
            inputs = engine.runner.prepare(ScheduledBatch((ScheduledSeq(req, num_new),)).snapshot(engine.stop))
            with torch.inference_mode():
                hidden = engine.runner.model.forward(inputs.input_ids, engine.runner._layer_metas(inputs.metas),
                                                     engine.runner.kv_caches).float()
            parts.append(hidden)
            req.num_computed_tokens += num_new
    finally:
        engine.kv.free(req)
    if pooling == "last":
        pooled = parts[-1][-1]
    elif len(parts) == 1:
        pooled = parts[0].mean(0)
    else:
        pooled = parts[0].sum(0)
        for part in parts[1:]:
            pooled = pooled + part.sum(0)
        pooled = pooled / len(ids)
    return torch.nn.functional.normalize(pooled, dim=0).tolist()


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_scheduled_embeddings_equal_the_synchronous_ones(build, plain, pooling):
    chunky = LLM(build, backend="cpu", kv_cache_memory=1 << 22, max_num_batched_tokens=8)
    for llm in (plain, chunky):
        for text in (PROMPTS[1], PROMPTS[5], PROMPTS[6]):
            assert llm.embed(text, pooling=pooling)[0].outputs.embedding == _synchronous_embedding(llm, text, pooling)
    # a prompt whose blocks the prefix cache holds is still computed in full: the pooled state sees every row
    plain.generate(PROMPTS[6], GREEDY, use_tqdm=False)
    want = _synchronous_embedding(plain, PROMPTS[6], pooling)
    assert plain.embed(PROMPTS[6], pooling=pooling)[0].outputs.embedding == want
    assert _pool_is_full(plain) and _pool_is_full(chunky)


def test_embeddings_are_scheduled_with_generation(build):
    llm = LLM(build, backend="cpu", kv_cache_memory=1 << 22, max_num_batched_tokens=16)
    engine = llm.engine
    engine.add_request("g", PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True, temperature=0))
    engine.step()
    engine.add_embedding_request("e", {"prompt_token_ids": [7] * 300}, "mean")
    finished: dict[str, int] = {}
    num_steps = 0
    while engine.has_unfinished():
        num_steps += 1
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = num_steps
        assert engine.scheduler.num_running <= 2
    # the 300-token embedding takes 20 steps of at most 16 tokens; the running completion decodes beside it
    assert finished["g"] == 3 and finished["e"] >= 19
    assert _pool_is_full(llm)
    engine.add_embedding_request("gone", {"prompt_token_ids": [7] * 300}, "last")
    engine.step()
    assert engine.kv.num_free_blocks < engine.kv.num_blocks and engine.num_requests() == (1, 0)
    engine.abort_request("gone")
    assert _pool_is_full(llm) and not engine.has_unfinished() and engine.num_unfinished_requests() == 0
    with pytest.raises(ValueError, match="pooling must be one of 'last', 'mean', 'cls', got 'max'"):
        engine.add_embedding_request("bad", "text", "max")
    with pytest.raises(ValueError, match="maximum context length is 512 tokens.*contains 600 tokens"):
        llm.embed([[5] * 600])
