"""Bounds on what one request makes the engine build: its outputs' entries (n x max_tokens x (1 + logprobs), and
the prompt's logprobs) and the text its chat template renders."""

from __future__ import annotations

import pytest

from pllm import LLM, SamplingParams
from pllm.models.chat_template import ChatPromptTooLong
from pllm.runtime.engine.sampling_params import MAX_OUTPUT_ENTRIES, InvalidParam

CONTEXT = 4096  # long enough that n=128 with logprobs=20 can pass the bound: 128 x 4090 x 21 = 11M entries


@pytest.fixture(scope="module")
def long_llm(tiny_build):
    llm = LLM(str(tiny_build("llama", max_position_embeddings=CONTEXT)), backend="cpu", kv_cache_memory=1 << 23)
    assert llm.engine.max_model_len == CONTEXT
    yield llm
    llm.close()


def test_the_bound_names_the_fields_and_the_limit():
    params = SamplingParams(n=128, logprobs=20, max_tokens=None)
    with pytest.raises(InvalidParam) as info:
        params.check_output_size(10, 2000)
    assert info.value.param == "max_tokens"
    message = str(info.value)
    assert "n x max_tokens x (1 + logprobs) = 128 x 2000 x 21" in message and str(MAX_OUTPUT_ENTRIES) in message
    assert "max_tokens unset" in message


def test_the_bound_is_inclusive():
    per_seq = MAX_OUTPUT_ENTRIES // 128
    SamplingParams(n=128, max_tokens=per_seq).check_output_size(1, per_seq)
    with pytest.raises(InvalidParam):
        SamplingParams(n=128, max_tokens=per_seq + 1).check_output_size(1, per_seq + 1)


def test_prompt_logprobs_count_with_the_prompt_length():
    num_prompt = MAX_OUTPUT_ENTRIES // 21 + 1  # 21 entries a prompt token: past the limit, the output token aside
    SamplingParams(max_tokens=1).check_output_size(num_prompt, 1)  # no prompt_logprobs: the prompt builds nothing
    with pytest.raises(InvalidParam, match=rf"prompt tokens x \(1 \+ prompt_logprobs\) = {num_prompt} x 21"):
        SamplingParams(max_tokens=1, prompt_logprobs=20).check_output_size(num_prompt, 1)


def test_the_engine_refuses_a_request_past_the_bound_and_queues_nothing(long_llm):
    engine = long_llm.engine
    with pytest.raises(InvalidParam, match=f"more than the limit of {MAX_OUTPUT_ENTRIES}"):
        engine.add_request("big", [1, 2, 3], SamplingParams(n=128, logprobs=20, max_tokens=None))
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="128 x 2000 x 21"):
        long_llm.generate("hi", SamplingParams(n=128, logprobs=20, max_tokens=2000), use_tqdm=False)


def test_max_tokens_counts_as_the_context_clamps_it(long_llm):
    """A max_tokens far past the context is cut to what it leaves before it is counted: n=1 with logprobs=20
    and a huge max_tokens (or none) is accepted, as before."""
    engine = long_llm.engine
    for rid, max_tokens in (("clamped", 10**6), ("unset", None)):
        engine.add_request(rid, [1, 2, 3], SamplingParams(logprobs=20, prompt_logprobs=20, max_tokens=max_tokens))
        engine.abort_request(rid)
    assert not engine.has_unfinished_requests()


def test_chat_stops_a_template_rendering_past_the_context(long_llm):
    """A template looping over its input: LLM.chat's render stops once past what max_model_len tokens can hold,
    with an error naming that limit (not the prompt-length error after rendering it all)."""
    template = "{% for i in range(100000) %}{{ messages[0].content }}{% endfor %}"
    conv = [{"role": "user", "content": "hello world " * 10}]
    with pytest.raises(ChatPromptTooLong, match=f"more than {long_llm._max_prompt_chars} characters"):
        long_llm.chat(conv, SamplingParams(max_tokens=1), use_tqdm=False, chat_template=template)


def test_chat_refuses_the_budget_as_a_template_variable(long_llm):
    """max_chars is the render's own budget: a template variable of that name is refused by name (the server
    refuses it among the reserved chat_template_kwargs), not a TypeError from a keyword given twice."""
    conv = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="'max_chars' is reserved"):
        long_llm.chat(conv, SamplingParams(max_tokens=1), use_tqdm=False, chat_template_kwargs={"max_chars": 10})
