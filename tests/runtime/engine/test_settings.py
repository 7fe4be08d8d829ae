"""SamplingParams and EngineConfig refuse a wrong type or range at construction, naming the field."""

import pytest

from pllm.runtime.engine.config import EngineConfig
from pllm.runtime.engine.sampling_params import SamplingParams


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 2**70),
        ("seed", True),
        ("seed", 1.5),
        ("logprobs", 1.5),
        ("logprobs", True),
        ("logit_bias", {"abc": 1}),
        ("logit_bias", {5: "x"}),
        ("logit_bias", {5: float("nan")}),
        ("logit_bias", [1, 2]),
        ("logit_bias", {"²": 1}),  # a digit to str.isdigit, not to int()
        ("logit_bias", {"--5": 1}),
        ("logit_bias", {"٣": 1}),
        ("stop", "\ud800"),
        ("stop", ["ok", "a\udfffb"]),
        ("stop", 123),
        ("stop", ["ok", 5]),
        ("stop_token_ids", 7),
        ("stop_token_ids", [True]),
        ("temperature", "1"),
        ("temperature", True),
        ("top_p", None),
        ("top_k", 2.0),
        ("min_p", "0"),
        ("presence_penalty", float("inf")),
        ("repetition_penalty", None),
        ("n", True),
        ("max_tokens", 3.0),
        ("max_tokens", True),
        ("min_tokens", False),
        ("ignore_eos", "yes"),
        ("skip_special_tokens", 1),
    ],
)
def test_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be .*got"):
        SamplingParams(**{field: value})


def test_sampling_params_accept_the_edges():
    assert SamplingParams(logit_bias={"12": 1, 7: -100}).logit_bias == {12: 1.0, 7: -100.0}
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1
    assert SamplingParams(seed=-(2**63)).seed == -(2**63)
    assert SamplingParams(stop="x", logprobs=0, temperature=0).stop_strings == ("x",)
    assert SamplingParams(stop=("a", "b")).stop_strings == ("a", "b")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_model_len", True),
        ("max_model_len", 0),
        ("max_num_seqs", True),
        ("max_num_batched_tokens", 2.0),
        ("kv_cache_memory", True),
        ("kv_cache_fraction", "0.5"),
        ("seed", 1.5),
        ("num_threads", 0),
        ("enforce_eager", "no"),
        ("huge_pages", 1),
        ("enable_prefix_caching", 0),
    ],
)
def test_engine_config_names_the_setting(field, value):
    with pytest.raises(ValueError, match=rf"^engine setting {field}="):
        EngineConfig(**{field: value})


def test_block_size_is_not_an_engine_setting():
    # The build fixes the block size (its kernels are specialised to it); a setting that is never read lies.
    with pytest.raises(TypeError, match="block_size"):
        EngineConfig(block_size=8)
