"""The offline API (LLM.generate / chat, SamplingParams) used as a vLLM user writes it: prompt shapes, params set after
construction, wrong argument types named, chat options, and a clean engine after an error or an interrupt."""

import pytest

from pllm import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)
CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


def test_prompt_shapes_mixed_in_one_batch_keep_order(plain):
    params = SamplingParams(max_tokens=3, **GREEDY)
    ids = plain.get_tokenizer()("b c").input_ids
    outs = plain.generate(["a b", {"prompt": "b c"}, {"prompt_token_ids": ids}, ids], params, use_tqdm=False)
    assert [o.prompt for o in outs] == ["a b", "b c", None, None]
    assert outs[1].prompt_token_ids == outs[2].prompt_token_ids == outs[3].prompt_token_ids == ids
    assert outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids == outs[3].outputs[0].token_ids
    assert plain.generate([], params, use_tqdm=False) == []
    with pytest.raises(ValueError, match="prompt is empty"):
        plain.generate("", params, use_tqdm=False)
    assert not plain.engine.has_unfinished()


@pytest.mark.parametrize("prompts, match", [
    (None, "prompts must be a prompt or a list of prompts"),
    (5, "prompts must be a prompt or a list of prompts"),
    (["a", 5], r"prompts\[1\] must be a str, a list of token ids"),
    ((1, 2, 3), r"prompts\[0\] must be a str"),
    ([[1, "2"]], r"prompts\[0\] must be a list of int token ids; it holds '2'"),
    ([{"prompt_token_ids": [1, None]}], r"prompts\[0\]\['prompt_token_ids'\] must be a list of int token ids"),
    ([{"prompt": 7}], r"prompts\[0\]\['prompt'\] must be a str"),
])
def test_a_prompt_of_the_wrong_type_is_named(plain, prompts, match):
    with pytest.raises(TypeError, match=match):
        plain.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)
    assert not plain.engine.has_unfinished()


@pytest.mark.parametrize("params, match", [
    ({"max_tokens": 3}, "sampling_params must be a SamplingParams, None, or a list"),
    ("greedy", "sampling_params must be a SamplingParams, None, or a list"),
    ([SamplingParams(), {"max_tokens": 3}], r"sampling_params\[1\] must be a SamplingParams, got dict"),
])
def test_sampling_params_of_the_wrong_type_are_named(plain, params, match):
    with pytest.raises(TypeError, match=match):
        plain.generate(["a", "b"], params, use_tqdm=False)


def test_fields_set_after_construction_are_honoured_and_checked(plain):
    """vLLM users set fields on a SamplingParams after building it; a stop set so must stop, a bad value must be
    refused naming the field, not run or crash deep in the engine."""
    base = plain.generate("hello world", SamplingParams(max_tokens=6, **GREEDY), use_tqdm=False)[0].outputs[0]
    params = SamplingParams(max_tokens=6, **GREEDY)
    params.stop = [base.text[3:6]]
    out = plain.generate("hello world", params, use_tqdm=False)[0].outputs[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", base.text[3:6])
    assert out.text == base.text[:3]
    params.stop = None
    assert plain.generate("hello world", params, use_tqdm=False)[0].outputs[0].text == base.text
    for field, value in (("temperature", -3.0), ("max_tokens", 0), ("top_p", 0.0), ("stop", 5)):
        params = SamplingParams(max_tokens=6)
        setattr(params, field, value)
        with pytest.raises(ValueError, match=f"^{field} must be"):
            plain.generate("hello world", params, use_tqdm=False)
    params = SamplingParams(max_tokens=6, **GREEDY)
    params.stop_token_ids = None  # normalised as at construction
    params.logit_bias = {str(base.token_ids[0]): -100}  # JSON-style keys, as at construction
    out = plain.generate("hello world", params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids[0] != base.token_ids[0]
    assert not plain.engine.has_unfinished()


def test_chat_takes_vllms_arguments(plain):
    params = SamplingParams(max_tokens=3, **GREEDY)
    one = plain.chat(CONV, params, use_tqdm=False)
    two = plain.chat([CONV, CONV[1:]], params, use_tqdm=False)
    assert len(one) == 1 and len(two) == 2
    tok = plain.get_tokenizer()
    text = tok.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True)
    assert one[0].prompt_token_ids == two[0].prompt_token_ids == tok(text, add_special_tokens=False).input_ids
    assert one[0].prompt is None  # as vLLM's chat: the prompt goes in as token ids
    partial = CONV + [{"role": "assistant", "content": "Sure, the"}]
    cont = plain.chat(partial, params, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)[0]
    assert tok.decode(cont.prompt_token_ids).endswith("Sure, the")
    with pytest.raises(ValueError, match="add_generation_prompt and continue_final_message"):
        plain.chat(partial, params, use_tqdm=False, continue_final_message=True)
    template = "{% for m in messages %}{{ m.content }}|{% endfor %}"
    custom = plain.chat(CONV, params, False, None, template)[0]  # vLLM's positional order
    assert custom.prompt_token_ids == tok("be brief|hi there|", add_special_tokens=False).input_ids
    with pytest.raises(ValueError, match="lora_request must be a LoRARequest"):
        plain.chat(CONV, params, False, True)  # pllm's old 4th positional (add_generation_prompt) is refused
    with pytest.raises(TypeError, match="messages must be a conversation"):
        plain.chat("hi", params, use_tqdm=False)
    assert plain.chat([], params, use_tqdm=False) == []
    assert not plain.engine.has_unfinished()


def test_an_interrupt_mid_batch_leaves_the_engine_clean(plain, monkeypatch):
    real_step, calls = plain.engine.step, []

    def interrupted():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(plain.engine, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plain.generate(["a", "b", "c"], SamplingParams(max_tokens=8, **GREEDY))
    monkeypatch.undo()
    assert not plain.engine.has_unfinished()
    outs = plain.generate(["a", "b"], SamplingParams(n=2, max_tokens=3, **GREEDY), use_tqdm=True)
    assert [[c.index for c in o.outputs] for o in outs] == [[0, 1], [0, 1]]
    assert all(o.finished and c.finish_reason == "length" for o in outs for c in o.outputs)


def test_an_interrupt_while_queueing_leaves_nothing_queued(plain, monkeypatch):
    """Ctrl-C while a long batch is being tokenized and queued: the requests queued before it must not linger (the
    next generate() would run them, unasked)."""
    real_add, calls = plain.engine.add_request, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_add(*args, **kwargs)

    monkeypatch.setattr(plain.engine, "add_request", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plain.generate(["a", "b", "c", "d"], SamplingParams(max_tokens=4), use_tqdm=False)
    monkeypatch.undo()
    assert not plain.engine.has_unfinished()


def test_embed_takes_prompts_as_generate_does(plain):
    ids = plain.get_tokenizer()("hello world").input_ids
    one = plain.embed(ids)  # one list of token ids is one prompt, as in generate() (and vLLM)
    assert len(one) == 1 and one[0].outputs.embedding == plain.embed("hello world")[0].outputs.embedding
    assert plain.embed({"prompt_token_ids": ids})[0].outputs.embedding == one[0].outputs.embedding
    for texts, match in ((None, "texts must be a prompt or a list"), (["a", None], r"texts\[1\] must be a str")):
        with pytest.raises(TypeError, match=match):
            plain.embed(texts)
    assert not plain.engine.has_unfinished()
