"""The output-size bound names the field the client can lower to pass it: prompt_logprobs when the scored prompt
alone is past the limit (no max_tokens, n or logprobs would help), max_tokens otherwise."""

import pytest

from pllm import SamplingParams
from pllm.runtime.engine.sampling_params import MAX_OUTPUT_ENTRIES, InvalidParam


def test_a_prompt_too_long_to_score_names_prompt_logprobs():
    num_prompt = MAX_OUTPUT_ENTRIES // 21 + 1
    with pytest.raises(InvalidParam) as info:
        SamplingParams(max_tokens=1, prompt_logprobs=20).check_output_size(num_prompt, 1)
    assert info.value.param == "prompt_logprobs"
    assert "lower prompt_logprobs" in str(info.value)


def test_outputs_past_the_bound_still_name_max_tokens():
    with pytest.raises(InvalidParam) as info:
        SamplingParams(n=128, logprobs=20, prompt_logprobs=1).check_output_size(10, 2000)
    assert info.value.param == "max_tokens"
