"""Prompt logprobs equal transformers' log-softmax of its logits (fp32, 1e-4): batched, chunked, cached, preempted."""

import pytest
import torch
import transformers

from pllm import LLM, SamplingParams
from pllm.runtime.engine.sampling_params import InvalidParam

TOL = 1e-4  # fp32 on both sides; the sums of a 64-wide model differ by a few ulps, far below this
K = 3
PROMPTS = [
    "Hello, world!",
    "Paged attention keeps the KV cache in fixed-size blocks, and the scheduler " * 3,
    "Grüße aus Köln. こんにちは世界. 你好",
    "def main():\n    return 42",
    "Bonjour le monde. " * 8,
]
SCORE = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=K)
# one block per 16 tokens, k+v, 2 layers, 2 kv heads, head_dim 16, fp32
KV_BYTES_PER_BLOCK = 2 * 2 * 16 * 2 * 16 * 4


@pytest.fixture(scope="module")
def hf(tiny_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir("llama")), dtype=torch.float32)


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab] log_softmax of HF's fp32 logits at each position that predicts a prompt token."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def assert_matches_hf(hf, out, k: int = K) -> None:
    ids = out.prompt_token_ids
    entries = out.prompt_logprobs
    assert entries is not None and len(entries) == len(ids) and entries[0] is None  # one per token, no duplicates
    ref = hf_logprobs(hf, ids)
    for pos, e in enumerate(entries[1:], start=1):
        row, token = ref[pos - 1], ids[pos]
        assert next(iter(e)) == token  # vLLM's order: the prompt token first, then the best
        want = row[token].item()
        assert abs(e[token].logprob - want) < TOL, (pos, e[token].logprob, want)
        # its rank in the whole vocabulary: 1 + the logprobs above it (HF's within the tolerance)
        assert int((row > want + TOL).sum()) < e[token].rank <= int((row >= want - TOL).sum()), pos
        values, top_ids = row.topk(k)
        best = sorted((lp.rank, t, lp.logprob) for t, lp in e.items() if lp.rank <= k)
        assert [t for _, t, _ in best] == top_ids.tolist() and [r for r, _, _ in best] == list(range(1, k + 1)), pos
        assert torch.allclose(torch.tensor([v for _, _, v in best]), values, atol=TOL, rtol=0)
        assert len(e) == k + (token not in top_ids.tolist())  # the prompt token once, whether among them or not


def test_batched_prompt_logprobs_equal_hf(build, hf):
    llm = LLM(build, backend="cpu", kv_cache_memory=1 << 24)
    plain = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    # scoring and plain requests share the steps; only the scoring ones get prompt logprobs
    outs = llm.generate(PROMPTS + PROMPTS[:2], [SCORE] * len(PROMPTS) + [plain] * 2, use_tqdm=False)
    for out in outs[: len(PROMPTS)]:
        assert_matches_hf(hf, out)
    assert all(o.prompt_logprobs is None for o in outs[len(PROMPTS) :])
    # prompt logprobs leave generation alone: the scored prompts generate what they do unscored
    alone = llm.generate(PROMPTS[:2], plain, use_tqdm=False)
    again = llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                                      prompt_logprobs=0), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in alone]
    assert all(len(e) == 1 for o in again for e in o.prompt_logprobs[1:])  # 0: only the prompt token's own


def test_chunked_prefill_and_preemption_score_each_token_once(build, hf):
    # 16-token chunks and 12 blocks for 5 long requests: prompts are split across steps and preempted mid-way
    llm = LLM(build, backend="cpu", kv_cache_memory=12 * KV_BYTES_PER_BLOCK, max_num_batched_tokens=16,
              max_num_seqs=5)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, prompt_logprobs=K)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for out in outs:
        assert_matches_hf(hf, out)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_preempted_mid_prompt_rescores_nothing(build, hf):
    """A request preempted while its prompt is half scored: the recompute scores only the rest."""
    llm = LLM(build, backend="cpu", kv_cache_memory=1 << 24, max_num_batched_tokens=16)
    engine = llm.engine
    engine.add_request("r", PROMPTS[1], SCORE)
    engine.step()
    engine.step()  # 32 of the prompt's tokens computed and scored
    request = engine.scheduler.get_request("r")
    assert request.num_prompt_logprob_rows == 32
    engine.scheduler.running.remove(request)
    engine.scheduler._preempt(request)
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            final = out
    assert_matches_hf(hf, final)


def test_prefix_cache_hit_does_not_drop_prompt_logprobs(build, hf):
    llm = LLM(build, backend="cpu", kv_cache_memory=1 << 24)
    warm = llm.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)[0]
    assert warm.num_cached_tokens == 0
    # the same prompt again: a hit for a plain request, but the scoring one computes (and scores) every token
    plain = llm.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)[0]
    assert plain.num_cached_tokens >= 16
    scored = llm.generate([PROMPTS[1]], SCORE, use_tqdm=False)[0]
    assert scored.num_cached_tokens == 0
    assert_matches_hf(hf, scored)
    assert scored.outputs[0].token_ids == plain.outputs[0].token_ids


def test_n_sequences_share_one_scoring(build, hf):
    llm = LLM(build, backend="cpu", kv_cache_memory=1 << 24)
    out = llm.generate([PROMPTS[0]], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=3, prompt_logprobs=2),
                       use_tqdm=False)[0]
    assert len(out.outputs) == 3
    assert_matches_hf(hf, out, k=2)


def test_lm_head_runs_on_the_scored_rows_only(build, monkeypatch):
    llm = LLM(build, backend="cpu", kv_cache_memory=1 << 24)
    model = llm.engine.runner.model
    rows: list[int] = []
    real = model.logits
    monkeypatch.setattr(model, "logits", lambda hidden: rows.append(hidden.shape[0]) or real(hidden))
    ids = llm.tokenizer(PROMPTS[4]).input_ids
    llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    assert sorted(rows) == [1, len(ids) - 1]  # the sampled row, and the rows predicting prompt tokens 1..end
    rows.clear()
    llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1), use_tqdm=False)
    assert rows == [1]


@pytest.mark.parametrize("value", [-1, 21, 1.5, True])
def test_prompt_logprobs_bounded(value):
    with pytest.raises(InvalidParam) as e:
        SamplingParams(prompt_logprobs=value)
    assert e.value.param == "prompt_logprobs"


def test_every_output_carries_the_whole_prompts_logprobs(build, hf):
    """n = 2: the second sequence (a prefix-cache reader) samples while the first, which scores the prompt, waits;
    no output goes out with part of the prompt scored."""
    llm = LLM(build, backend="cpu", kv_cache_memory=1 << 24, max_num_batched_tokens=16)
    engine = llm.engine
    engine.add_request("g", PROMPTS[1], SamplingParams(n=2, temperature=0.0, max_tokens=3, prompt_logprobs=1))
    engine.step()  # the first 16 tokens of sequence 0
    first = engine.scheduler.get_request("g#0")
    engine.scheduler.running.remove(first)
    engine.scheduler._preempt(first)
    engine.scheduler.waiting.rotate(-1)  # sequence 1 goes first
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert outputs and outputs[-1].finished
    assert all(len(o.prompt_logprobs) == len(o.prompt_token_ids) for o in outputs)
    assert_matches_hf(hf, outputs[-1], k=1)
