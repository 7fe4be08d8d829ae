"""Structured output through the Python API on a tiny random model: only the grammar can make its output valid."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import Future

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pllm import LLM, SamplingParams, StructuredOutputsParams
from pllm.runtime.engine.grammar_process import GrammarProcess
from pllm.runtime.engine.param_checks import InvalidParam
from pllm.runtime.engine.structured_output import GrammarCache, GrammarError
from pllm.runtime.engine.structured_outputs_params import MAX_CHOICES, MAX_STRUCTURED_CHARS

PROMPTS = ["Hello, world!", "Paged attention keeps the KV cache", "def main():", "Bonjour le monde. " * 4]
# every field bounded, so a random model's output ends within max_tokens and only the grammar makes it valid
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok", "tags"],
}


def validate(schema: dict, value: object, path: str = "$") -> None:
    """A JSON-schema check for the subset drawn here (jsonschema is not a dependency); AssertionError names where."""
    kind = schema.get("type")
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    if kind == "object":
        assert isinstance(value, dict), f"{path}: {value!r} is not an object"
        props = schema.get("properties", {})
        assert set(schema.get("required", [])) <= set(value), f"{path}: missing {schema.get('required')}"
        assert set(value) <= set(props), f"{path}: extra keys {set(value) - set(props)}"
        for key, item in value.items():
            validate(props[key], item, f"{path}.{key}")
    elif kind == "array":
        assert isinstance(value, list), f"{path}: {value!r} is not an array"
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)), f"{path}: length"
        for i, item in enumerate(value):
            validate(schema["items"], item, f"{path}[{i}]")
    elif kind == "string":
        assert isinstance(value, str), f"{path}: {value!r} is not a string"
        assert schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)), f"{path}: length"
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{path}: {value!r} is not an integer"
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), f"{path}: {value} out of range"
    elif kind == "boolean":
        assert isinstance(value, bool), f"{path}: {value!r} is not a boolean"


def parse_valid(schema: dict, out) -> object:
    assert out.finish_reason == "stop", (out.finish_reason, out.text)
    value = json.loads(out.text)  # strict: a raw control character in a string fails here
    validate(schema, value)
    return value


_names = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6)
_scalars = st.one_of(
    st.builds(lambda n, m: {"type": "string", "minLength": n, "maxLength": n + m},
              st.integers(0, 2), st.integers(0, 6)),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(0, 200)),
    st.just({"type": "boolean"}),
    st.builds(lambda vs: {"type": "string", "enum": vs}, st.lists(st.text(min_size=1, max_size=5), min_size=1,
                                                                  max_size=4, unique=True)),
)
_fields = st.one_of(_scalars, st.builds(lambda item, n: {"type": "array", "items": item, "maxItems": n},
                                        _scalars, st.integers(0, 3)))


@st.composite
def schemas(draw) -> dict:
    props = draw(st.dictionaries(_names, _fields, min_size=1, max_size=4))
    required = [k for k in props if draw(st.booleans())]
    return {"type": "object", "properties": props, "required": required}


@pytest.fixture(scope="module")
def llm(tiny_build):
    return LLM(str(tiny_build("llama")), backend="cpu", kv_cache_memory=1 << 24)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=schemas(), temperature=st.sampled_from([0.0, 0.7, 1.5]), seed=st.integers(0, 2**16))
def test_drawn_schemas_always_parse_and_validate(llm, schema, temperature, seed):
    params = SamplingParams(temperature=temperature, seed=seed, max_tokens=200, n=2,
                            structured_outputs=StructuredOutputsParams(json=schema))
    for request in llm.generate(PROMPTS[:2], params, use_tqdm=False):
        for out in request.outputs:
            parse_valid(schema, out)


def test_json_schema_text_and_key_order_share_one_grammar(llm):
    before = llm.engine.grammars.num_compiled
    reordered = json.dumps(dict(reversed(list(PERSON.items()))))
    outs = llm.generate(PROMPTS, [
        SamplingParams(temperature=1.0, seed=1, max_tokens=200, structured_outputs=StructuredOutputsParams(json=s))
        for s in (PERSON, reordered, PERSON, reordered)
    ], use_tqdm=False)
    assert llm.engine.grammars.num_compiled - before <= 1  # one spec, however written (0 when cached earlier)
    for o in outs:
        assert list(parse_valid(PERSON, o.outputs[0])) == ["name", "age", "ok", "tags"]
    # the order of properties is the order of the output: a schema listing them reversed is another grammar
    backwards = {**PERSON, "properties": dict(reversed(list(PERSON["properties"].items())))}
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, seed=1, max_tokens=200, structured_outputs=(
        StructuredOutputsParams(json=backwards))), use_tqdm=False)[0].outputs[0]
    assert list(parse_valid(PERSON, out)) == ["tags", "ok", "age", "name"]


def test_regex_choice_and_grammar(llm):
    cases = [
        (StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        (StructuredOutputsParams(choice=["yes", 'no "way"', "maybe\nnot"]), lambda t: t in ("yes", 'no "way"',
                                                                                           "maybe\nnot")),
        (StructuredOutputsParams(grammar='root ::= ("hi" | "hello") " " [a-z]{1,5}'),
         lambda t: re.fullmatch(r"(hi|hello) [a-z]{1,5}", t)),
    ]
    for spec, check in cases:
        for temperature in (0.0, 1.0):
            params = SamplingParams(temperature=temperature, seed=3, n=3, max_tokens=50, structured_outputs=spec)
            for request in llm.generate(PROMPTS, params, use_tqdm=False):
                for out in request.outputs:
                    assert out.finish_reason == "stop" and check(out.text), (spec, out.text)


def test_json_object_is_an_object(llm):
    params = SamplingParams(temperature=0.0, max_tokens=200, structured_outputs=StructuredOutputsParams(
        json_object=True))
    for request in llm.generate(PROMPTS, params, use_tqdm=False):
        out = request.outputs[0]
        assert out.text.startswith("{")
        if out.finish_reason == "stop":  # an unbounded object may also run into max_tokens, as in vLLM
            assert isinstance(json.loads(out.text), dict)


def test_constrained_and_free_requests_share_a_step(llm):
    free = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, free, use_tqdm=False)]
    constrained = SamplingParams(temperature=0.0, max_tokens=200,
                                 structured_outputs=StructuredOutputsParams(json=PERSON))
    steps = []
    sample = llm.engine.sampler.sample

    def spy(logits, requests):
        steps.append([r.token_bitmask is not None for r in requests])
        return sample(logits, requests)

    llm.engine.sampler.sample = spy
    try:
        outs = llm.generate(PROMPTS * 2, [free] * 4 + [constrained] * 4, use_tqdm=False)
    finally:
        del llm.engine.sampler.sample
    assert any(any(s) and not all(s) for s in steps)  # one step sampled constrained and free rows together
    assert [o.outputs[0].token_ids for o in outs[:4]] == alone  # the mask touched only its own rows
    for o in outs[4:]:
        parse_valid(PERSON, o.outputs[0])


def test_preemption_mid_json_keeps_the_grammar_in_step(tiny_build):
    build = str(tiny_build("llama"))
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.9, seed=i, max_tokens=120,
                             structured_outputs=StructuredOutputsParams(json=PERSON)) for i in range(8)]
    roomy = LLM(build, backend="cpu", kv_cache_memory=1 << 24)
    alone = [roomy.generate([p], [q], use_tqdm=False)[0].outputs[0].token_ids for p, q in zip(PROMPTS * 2, params)]
    kv_bytes_per_block = 2 * 2 * 16 * 2 * 16 * 4  # k+v, layers, block, kv heads, head_dim, fp32
    tight = LLM(build, backend="cpu", kv_cache_memory=8 * kv_bytes_per_block, max_num_seqs=8)
    outs = tight.generate(PROMPTS * 2, params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    for o, ids in zip(outs, alone):
        parse_valid(PERSON, o.outputs[0])
        assert o.outputs[0].token_ids == ids  # recompute resumed each matcher exactly where its output was


def test_finished_grammar_allows_only_eos_over_min_tokens_and_ignore_eos(llm):
    spec = StructuredOutputsParams(choice=["yes", "no"])
    for extra in ({"min_tokens": 10}, {"ignore_eos": True}, {"ignore_eos": True, "skip_special_tokens": False}):
        out = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, seed=5, max_tokens=30, structured_outputs=spec,
                                                      **extra), use_tqdm=False)[0].outputs[0]
        assert out.finish_reason == "stop" and out.text in ("yes", "no"), (extra, out)
        assert out.token_ids[-1] in llm.engine.eos_token_ids


def test_max_tokens_cuts_json_short_with_length(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=3, structured_outputs=(
        StructuredOutputsParams(json=PERSON))), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    assert '{"name": "'.startswith(out.text)  # the grammar's prefix, cut short: it does not parse (as in vLLM)
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


def test_compilation_waits_in_the_queue_not_the_batch(llm, monkeypatch):
    release = threading.Event()
    check_in_process = GrammarProcess.check

    def slow(process, kind, value):  # the grammar thread waiting on its process
        assert release.wait(30)
        return check_in_process(process, kind, value)

    monkeypatch.setattr(GrammarProcess, "check", slow)
    engine = llm.engine
    slow_spec = StructuredOutputsParams(regex="[a-c]{4} waits")
    engine.add_request("slow", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=30, structured_outputs=slow_spec))
    engine.add_request("free", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    finished = {}
    while "free" not in finished:  # the free request runs to the end while the grammar compiles
        finished.update({o.request_id: o for o in engine.step() if o.finished})
        assert engine.request_status("slow").value == "waiting"
    release.set()
    while engine.has_unfinished():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert re.fullmatch("[a-c]{4} waits", finished["slow"].outputs[0].text)


def test_bad_specs_raise_naming_the_field_before_queueing(llm):
    cases = [
        ({"json": {"type": "wat"}}, "structured_outputs.json", "Unsupported type"),
        ({"json": '{"type": '}, "structured_outputs.json", "not valid JSON"),
        ({"regex": "(abc"}, "structured_outputs.regex", "parenthesis"),
        ({"grammar": "root ::= nope"}, "structured_outputs.grammar", "nope"),
    ]
    for fields, param, text in cases:
        with pytest.raises(InvalidParam, match=re.escape(text)) as info:
            llm.generate(PROMPTS[0], SamplingParams(structured_outputs=StructuredOutputsParams(**fields)),
                         use_tqdm=False)
        assert info.value.param == param
        assert not llm.engine.has_unfinished()
    assert issubclass(GrammarError, InvalidParam)


@pytest.mark.parametrize("fields, message", [
    ({}, "exactly one of"),
    ({"regex": "a", "choice": ["a"]}, "exactly one of"),
    ({"regex": "a" * (MAX_STRUCTURED_CHARS + 1)}, "at most"),
    ({"choice": []}, "a list of 1 to"),
    ({"choice": ["x"] * (MAX_CHOICES + 1)}, "a list of 1 to"),
    ({"choice": ["ok", ""]}, "non-empty strings"),
    ({"json": [1, 2]}, "a JSON schema"),
    ({"json": {"a": {"b": {"c": 1}}} | {"deep": json.loads("[" * 40 + "]" * 40)}}, "nested at most"),
    ({"json": "[" * 50_000 + "]" * 50_000}, "at most"),
])
def test_structured_outputs_bounds(fields, message):
    with pytest.raises(InvalidParam, match=message) as info:
        SamplingParams(structured_outputs=StructuredOutputsParams(**fields))
    assert info.value.param.startswith("structured_outputs")
    with pytest.raises(InvalidParam, match="StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": {}})


def test_grammar_cache_is_a_bounded_lru(llm):
    cache = GrammarCache(llm.tokenizer, llm.engine.spec.vocab_size, llm.engine.eos_token_ids, max_entries=2)
    specs = [StructuredOutputsParams(regex=r) for r in ("a+", "b+", "c+")]
    futures = [cache.compile(s) for s in specs]
    assert cache.compile(specs[0]) is not futures[0]  # evicted by the third: compiled again
    assert cache.compile(specs[2]) is futures[2] and cache.num_compiled == 4
    assert all(f.result() is not None for f in futures)
    cache.shutdown()


def test_json_strings_are_json_and_utf8(llm):
    """Corrections to the library's JSON grammar: no raw control characters or surrogates in strings (bounded or
    not), and enum strings with U+0080-U+00FF followed by a hex digit stay themselves."""
    import xgrammar as xgr

    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 4}, "b": {"type": "string"},
                                               "c": {"enum": ["\x800", "é1"]}}, "required": ["a", "b", "c"]}
    grammar = llm.engine.grammars.compile(StructuredOutputsParams(json=schema)).result()

    def accepts(text: str) -> bool:
        matcher = xgr.GrammarMatcher(grammar)
        return matcher.accept_string(text)

    assert accepts('{"a": "ok", "b": "fine", "c": "\x800"}') and accepts('{"a": "", "b": "", "c": "é1"}')
    assert not accepts('{"a": "\x19') and not accepts('{"a": "", "b": "\t')
    assert not accepts('{"a": "", "b": "", "c": "\u0800"}')
    tok = llm.tokenizer
    for field in ('{"a": "', '{"a": "", "b": "'):
        matcher = xgr.GrammarMatcher(grammar)
        assert matcher.accept_string(field)
        byte_ids = [tok.convert_tokens_to_ids(t) for t in ("í", "º")]  # bytes 0xED 0xBA: U+D800-U+DFFF ahead
        assert matcher.accept_token(byte_ids[0]) and not matcher.accept_token(byte_ids[1]), field


def test_a_failed_grammar_finishes_its_request_even_when_it_waits_for_prompt_logprobs(llm, monkeypatch):
    """A request queued without the compile-first check is aborted when its grammar fails; asking for prompt
    logprobs (whose outputs wait until the prompt is scored) must not hold that final output back forever."""
    engine = llm.engine
    pending = Future()  # still compiling when the request is queued; fails only afterwards, whatever ran before
    monkeypatch.setattr(engine.grammars, "compile", lambda spec: pending)
    bad = StructuredOutputsParams(regex="(abc")
    engine.add_request("bad", PROMPTS[0], SamplingParams(prompt_logprobs=1, structured_outputs=bad))
    pending.set_exception(GrammarError("structured_outputs.regex", "structured_outputs.regex could not be compiled"))
    finished = {}
    deadline = time.monotonic() + 60
    while engine.has_unfinished() and time.monotonic() < deadline:  # the grammar compiles on a worker thread
        finished.update({o.request_id: o for o in engine.step() if o.finished})
        time.sleep(0.01)
    assert finished["bad"].outputs[0].finish_reason == "abort" and finished["bad"].outputs[0].token_ids == []
    assert engine.num_unfinished_requests() == 0
