"""vLLM's offline examples and the usual `vllm.LLM` calls, run with only the import changed: the keyword arguments a
script passes without thinking (honoured, or refused naming what is not supported), llm.llm_engine, chat content
parts, vLLM's prompt TypedDicts, SamplingParams.clone and the adapter on each output."""

import pytest
import torch

import pllm
from pllm import LLM, LoRARequest, SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True, max_tokens=3)
KV = 1 << 24


def test_llm_takes_vllms_keyword_arguments(build, plain):
    """vLLM's basic.py spelling, LLM(model=...), with the settings scripts pass by habit."""
    llm = LLM(model=build, dtype="auto", seed=None, trust_remote_code=True, tokenizer=build, enforce_eager=True,
              max_model_len=64, gpu_memory_utilization=0.5, backend="cpu", kv_cache_memory=KV)
    assert llm.engine.config.kv_cache_fraction == 0.5 and llm.engine.config.seed == 0
    assert llm.llm_engine is llm.engine  # vLLM's name for the engine under the LLM
    out = llm.generate(["a b c"], SamplingParams(**GREEDY), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == plain.generate(["a b c"], SamplingParams(**GREEDY),
                                                      use_tqdm=False)[0].outputs[0].token_ids
    for dtype in ("float32", torch.float32):  # the build's own dtype, by name or as torch names it
        assert LLM(build, dtype=dtype, backend="cpu", kv_cache_memory_bytes=KV).engine.config.kv_cache_memory == KV


@pytest.mark.parametrize("settings, error, match", [
    (dict(dtype="float16"), ValueError, r"dtype='float16': this build's weights are float32.*pllm-compile --dtype"),
    (dict(dtype="int3"), ValueError, "dtype='int3': must be 'auto' or one of"),
    (dict(tokenizer="/elsewhere"), ValueError, "serves the tokenizer it was compiled with"),
    (dict(quantization="awq"), TypeError, r"quantization: a build's quantization is chosen when it is compiled"),
    (dict(swap_space=4), TypeError, "swap_space: preempted sequences are recomputed"),
    (dict(gpu_memory_utilization=0.5, kv_cache_fraction=0.5), TypeError, "name the same engine setting"),
    (dict(runner="draft"), ValueError, "runner must be one of"),
    (dict(trust_remote_code="yes"), ValueError, "trust_remote_code must be True or False"),
])
def test_vllm_arguments_without_a_meaning_here_are_refused_by_name(build, settings, error, match):
    with pytest.raises(error, match=match):
        LLM(build, backend="cpu", kv_cache_memory=KV, **settings)


def test_runner_and_enable_lora_as_vllm_reads_them(build, tiny_loras):
    pooling = LLM(build, runner="pooling", backend="cpu", kv_cache_memory=KV)
    assert len(pooling.embed(["hello world"])[0].outputs.embedding) > 0
    with pytest.raises(ValueError, match="runner='pooling'.*does not generate"):
        pooling.generate("hello", SamplingParams(**GREEDY), use_tqdm=False)
    with pytest.raises(ValueError, match="runner='pooling'"):
        pooling.chat([{"role": "user", "content": "hi"}], SamplingParams(**GREEDY), use_tqdm=False)
    no_lora = LLM(build, enable_lora=False, backend="cpu", kv_cache_memory=KV)
    alpha = LoRARequest("alpha", 1, str(tiny_loras["alpha"]))
    with pytest.raises(ValueError, match="enable_lora=False"):
        no_lora.generate("hello", SamplingParams(**GREEDY), use_tqdm=False, lora_request=alpha)
    assert not no_lora.engine.has_unfinished()


def test_outputs_name_their_adapter(plain, tiny_loras):
    """vLLM's RequestOutput.lora_request / CompletionOutput.lora_request: the adapter each prompt ran under."""
    alpha = LoRARequest("alpha", 1, str(tiny_loras["alpha"]))
    outs = plain.generate(["a b", "a b"], SamplingParams(n=2, **GREEDY), use_tqdm=False, lora_request=[alpha, None])
    assert outs[0].lora_request is alpha and all(c.lora_request is alpha for c in outs[0].outputs)
    assert outs[1].lora_request is None and all(c.lora_request is None for c in outs[1].outputs)


def test_chat_takes_openai_text_content_parts(plain):
    """A message's content as OpenAI's list of parts: its text parts joined by newlines, as vLLM renders them."""
    params = SamplingParams(**GREEDY)
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}, "there", {"type": "input_text",
                                                                                    "text": "friend"}]}]
    joined = [{"role": "user", "content": "hi\nthere\nfriend"}]
    assert plain.apply_chat_template(parts) == plain.apply_chat_template(joined)
    a, b = plain.chat([parts, joined], params, use_tqdm=False)
    assert a.prompt_token_ids == b.prompt_token_ids and a.outputs[0].token_ids == b.outputs[0].token_ids
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    with pytest.raises(ValueError, match=r"messages\[0\]\['content'\]\[0\]: content part .*image_url.* not supported"):
        plain.chat(image, params, use_tqdm=False)
    assert not plain.engine.has_unfinished()


def test_vllm_prompt_dicts(plain):
    """TextPrompt / TokensPrompt as vLLM exports them; a key pllm would ignore (an image, a cache salt) is refused,
    not dropped."""
    from pllm import TextPrompt, TokensPrompt

    ids = plain.get_tokenizer()("a b").input_ids
    outs = plain.generate([TextPrompt(prompt="a b"), TokensPrompt(prompt_token_ids=ids)], SamplingParams(**GREEDY),
                          use_tqdm=False)
    assert outs[0].prompt_token_ids == outs[1].prompt_token_ids == ids
    assert "TextPrompt" in pllm.__all__ and "TokensPrompt" in pllm.__all__
    for key in ("multi_modal_data", "cache_salt"):
        with pytest.raises(ValueError, match=rf"prompts\[0\]: prompt key\(s\) '{key}' are not supported"):
            plain.generate([{"prompt": "a b", key: None}], SamplingParams(**GREEDY), use_tqdm=False)
        with pytest.raises(ValueError, match=f"'{key}' are not supported"):
            plain.embed([{"prompt_token_ids": ids, key: None}])
    assert not plain.engine.has_unfinished()


def test_sampling_params_clone_is_independent():
    params = SamplingParams(temperature=0.3, stop=["x"], logit_bias={1: 2.0})
    copy = params.clone()
    copy.temperature, copy.stop = 0.9, ["y"]
    copy.logit_bias[1] = -5.0
    assert (params.temperature, params.stop, params.logit_bias) == (0.3, ["x"], {1: 2.0})


def test_completion_finished_is_a_method_as_vllms(plain):
    """vLLM scripts call out.outputs[0].finished(); RequestOutput.finished stays a field."""
    out = plain.generate("a b", SamplingParams(**GREEDY))[0]
    assert out.finished is True and out.outputs[0].finished() is True


def test_llm_engine_get_tokenizer(plain):
    """vLLM scripts reach the tokenizer as llm.llm_engine.get_tokenizer()."""
    assert plain.llm_engine.get_tokenizer() is plain.get_tokenizer()


def test_vllm_engine_loop_and_its_prompt_checks(plain):
    """vLLM's llm_engine_example loop: add_request, then step while has_unfinished_requests(); a prompt key the
    engine would drop is refused there too, not only by LLM.generate."""
    engine = plain.llm_engine
    engine.add_request("r", {"prompt": "a b"}, SamplingParams(**GREEDY))
    assert engine.get_num_unfinished_requests() == 1
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["r"] and len(finished[0].outputs[0].token_ids) == 3
    with pytest.raises(ValueError, match="multi_modal_data"):
        engine.add_request("s", {"prompt": "a", "multi_modal_data": {}}, SamplingParams(**GREEDY))
    assert not engine.has_unfinished_requests()


def test_the_old_build_dir_keyword_names_its_new_name(build):
    with pytest.raises(TypeError, match="once named build_dir, named model"):
        LLM(build_dir=str(build))
    with pytest.raises(TypeError, match="needs model"):
        LLM()
