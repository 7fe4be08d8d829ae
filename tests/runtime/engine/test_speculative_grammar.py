"""Speculative decoding of requests with structured output: guesses cut at the first token the grammar refuses,
each verify row masked by the grammar's state after the guesses before it, and the matcher left holding exactly
the tokens output. Greedy output equals decoding without speculation, batched with unconstrained requests, and
always satisfies the grammar."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pllm import LLM, SamplingParams, StructuredOutputsParams

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
PROMPTS = [
    "Paged attention keeps the KV cache in fixed-size blocks. Paged attention keeps the KV cache in",
    "Hello, world! The quick brown fox jumps over the lazy dog. Hello, world! The quick",
    "def main():\n    return 42  # numbers 0123456789\ndef main():\n    return",
    "Bonjour le monde. " * 6,
]
# bounded fields, so a random model's output ends within max_tokens; enums and repeats give the lookup copies
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["ab", "ab ab", "b c"]}, "maxItems": 5},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "tags", "ok"],
}
REGEX = r"(ab|ba|abc){1,8}(-[0-9]{1,3}){0,6};"  # bounded: the random model must reach the end
CHOICES = ["KV cache in blocks", "KV cache in pages", "Paged attention"]


def _tool_call_schema() -> dict:
    """The schema pllm-serve forces for tool_choice "required" over two tools, one call (ToolCalling.forced_schema)."""
    from pllm.runtime.server.protocol_chat import ChatCompletionRequest
    from pllm.runtime.server.serving_tools import ToolCalling

    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                             "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"], "additionalProperties": False}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {
            "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
            "additionalProperties": False}}},
    ]
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=tools,
                                tool_choice="required", parallel_tool_calls=False)  # one call: bounded
    return ToolCalling.forced_schema(req)


def _params(kind: str) -> SamplingParams:
    spec = {
        "json": lambda: StructuredOutputsParams(json=PERSON),
        "regex": lambda: StructuredOutputsParams(regex=REGEX),
        "choice": lambda: StructuredOutputsParams(choice=CHOICES),
        "tool_call": lambda: StructuredOutputsParams(json=_tool_call_schema()),
    }[kind]()
    return SamplingParams(temperature=0.0, max_tokens=160, structured_outputs=spec)


FREE = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
KINDS = ["json", "regex", "choice", "tool_call"]


@pytest.fixture(scope="module")
def spec(build):
    return LLM(build, backend="cpu", kv_cache_memory=1 << 24, speculative_config=SPEC)


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def _check_output(kind: str, out) -> None:
    assert out.finish_reason == "stop", (kind, out.finish_reason, out.text)
    if kind == "json":
        value = json.loads(out.text)
        assert set(value) == {"name", "tags", "ok"} and len(value["name"]) <= 8 and isinstance(value["ok"], bool)
        assert all(t in ("ab", "ab ab", "b c") for t in value["tags"]) and len(value["tags"]) <= 5
    elif kind == "regex":
        assert re.fullmatch(REGEX, out.text), out.text
    elif kind == "choice":
        assert out.text in CHOICES, out.text
    else:
        calls = json.loads(out.text)
        assert isinstance(calls, list) and len(calls) == 1, out.text
        name, args = calls[0]["name"], calls[0]["parameters"]
        assert set(calls[0]) == {"name", "parameters"}, out.text
        if name == "get_weather":
            assert set(args) == {"city", "days"} and len(args["city"]) <= 10 and 1 <= args["days"] <= 7, args
        else:
            assert name == "get_time" and args in ({"tz": "UTC"}, {"tz": "CET"}), calls


def test_greedy_structured_batched_with_free_requests_equals_no_speculation(plain, spec):
    prompts, params = [], []
    for prompt in PROMPTS:
        for kind in KINDS:
            prompts.append(prompt)
            params.append(_params(kind))
        prompts.append(prompt)
        params.append(FREE)
    want = plain.generate(prompts, params, use_tqdm=False)
    got = spec.generate(prompts, params, use_tqdm=False)
    assert _tokens(got) == _tokens(want)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in want]
    for p, out in zip(params, got):
        if p is not FREE:
            _check_output(_kind_of(p), out.outputs[0])
    assert spec.engine.kv.num_free_blocks == spec.engine.kv.num_blocks


def _kind_of(params: SamplingParams) -> str:
    so = params.structured_outputs
    if so.json is not None:
        return "json" if so.json == PERSON else "tool_call"
    return so.kind


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_alone_equals_no_speculation_and_guesses_are_accepted(plain, spec, kind):
    params = _params(kind)
    want = plain.generate(PROMPTS, params, use_tqdm=False)
    stats = spec.engine.scheduler.spec_stats
    before = (stats.num_draft_tokens, stats.num_accepted_tokens)
    got = spec.generate(PROMPTS, params, use_tqdm=False)
    assert _tokens(got) == _tokens(want)
    for out in got:
        _check_output(kind, out.outputs[0])
    drafted, accepted = stats.num_draft_tokens - before[0], stats.num_accepted_tokens - before[1]
    assert drafted > 0, kind  # the grammar's requests are speculated
    if kind != "choice":  # a choice's tokens are mostly forced; its few guesses need not be the model's
        assert 0 < accepted < drafted, (kind, drafted, accepted)


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_structured_output_with_speculation_satisfies_the_grammar(spec, kind):
    """Rejection sampling on masked rows: an accepted guess and a token drawn after a rejection both obey the
    grammar state of their row."""
    base = _params(kind)
    for temperature in (0.3, 1.0):
        params = SamplingParams(temperature=temperature, seed=11, n=2, max_tokens=160,
                                structured_outputs=base.structured_outputs)
        for request in spec.generate(PROMPTS, params, use_tqdm=False):
            for out in request.outputs:
                _check_output(kind, out)


def test_min_tokens_and_grammar_end_inside_guesses(plain, spec):
    """min_tokens masks EOS per row only until the grammar's match may end at that row (the row's own state)."""
    params = SamplingParams(temperature=0.0, max_tokens=160, min_tokens=40,
                            structured_outputs=StructuredOutputsParams(regex=REGEX))
    want = plain.generate(PROMPTS, params, use_tqdm=False)
    got = spec.generate(PROMPTS, params, use_tqdm=False)
    assert _tokens(got) == _tokens(want)
    for out in got:
        _check_output("regex", out.outputs[0])


def test_verify_rows_carry_each_positions_mask_and_the_matcher_is_left_as_it_was(spec, monkeypatch):
    """A verify step of a grammar request: row j's bitmask is a fresh matcher's after the output and guesses
    0..j-1; after each step the request's matcher has accepted exactly the tokens output."""
    import xgrammar as xgr

    engine = spec.engine
    vocab = engine.spec.vocab_size
    params = _params("json")
    compiled = engine.grammars.compile(params.structured_outputs).result()

    def fresh_after(tokens) -> xgr.GrammarMatcher:
        m = xgr.GrammarMatcher(compiled)
        for t in tokens:
            assert m.accept_token(t)
        return m

    def mask_of(m) -> torch.Tensor:
        out = xgr.allocate_token_bitmask(1, vocab)
        m.fill_next_token_bitmask(out, 0)
        return out[0]

    execute, verified = engine.runner.execute, []

    def checked_execute(step):
        for seq in step.seqs:
            if seq.draft is None:
                continue
            fresh = fresh_after(engine.scheduler.get_request(seq.request_id).output_token_ids)
            for j, row in enumerate(seq.draft.rows):
                assert row.token_bitmask is not None and row.token_bitmask.equal(mask_of(fresh)), j
                if j < len(seq.draft.token_ids):
                    assert fresh.accept_token(seq.draft.token_ids[j]) and not fresh.is_terminated()
            verified.append(len(seq.draft.token_ids))
        return execute(step)

    monkeypatch.setattr(engine.runner, "execute", checked_execute)
    engine.add_request("probe", PROMPTS[1], params)
    request = engine.scheduler.get_request("probe")
    while engine.has_unfinished():
        engine.step()
        if request.status.value == "running":
            assert mask_of(request.grammar.matcher).equal(mask_of(fresh_after(request.output_token_ids)))
            assert request.grammar.num_accepted == len(request.output_token_ids)
    assert verified and request.finish_reason.value == "stop"


_GRAMMAR_CASES = [("json", PERSON), ("regex", REGEX), ("tool_call", None)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(_GRAMMAR_CASES), data=st.data())
def test_valid_prefix_and_states_along_match_a_fresh_matcher(spec, plain_outputs, case, data):
    """Guesses drawn from a valid output (an offset into it, a run of its tokens, one maybe replaced by another
    token): valid_prefix is the run a fresh matcher takes without terminating, states_along its bitmasks, and
    both leave the sequence's matcher where it was."""
    import xgrammar as xgr

    from pllm.runtime.engine.structured_output import SequenceGrammar

    kind = case[0]
    params = _params(kind)
    engine = spec.engine
    vocab = engine.spec.vocab_size
    tokens = data.draw(st.sampled_from(plain_outputs[kind]))
    future = engine.grammars.compile(params.structured_outputs)
    k = data.draw(st.integers(0, len(tokens) - 1))
    run = list(tokens[k : k + data.draw(st.integers(1, 8))])
    if data.draw(st.booleans()):
        run[data.draw(st.integers(0, len(run) - 1))] = data.draw(st.integers(0, vocab - 1))
    grammar = SequenceGrammar(future, vocab)
    grammar.start(list(tokens[:k]))

    def fresh() -> xgr.GrammarMatcher:
        m = xgr.GrammarMatcher(future.result())
        for t in tokens[:k]:
            assert m.accept_token(t)
        return m

    def mask_of(m) -> object:
        out = xgr.allocate_token_bitmask(1, vocab)
        m.fill_next_token_bitmask(out, 0)
        return out[0]

    oracle, want = fresh(), 0
    for t in run:
        if not oracle.accept_token(t) or oracle.is_terminated():
            break
        want += 1
    before = mask_of(grammar.matcher)
    assert grammar.valid_prefix(run) == want
    assert bool((mask_of(grammar.matcher) == before).all())
    states = grammar.states_along(run[:want])
    oracle = fresh()
    for j, state in enumerate(states):
        m = mask_of(oracle)
        assert (state.bitmask if state.bitmask is not None else torch.full_like(m, -1)).equal(m), j
        assert state.can_end == oracle.is_completed()
        if j < want:
            oracle.accept_token(run[j])
    assert bool((mask_of(grammar.matcher) == before).all()) and grammar.num_accepted == k
    if k < len(tokens):
        grammar.accept(tokens[k])  # the output goes on from where it was
        assert not grammar.rejected


@pytest.fixture(scope="module")
def plain_outputs(plain):
    """Valid outputs of each grammar case (sampled, several per case), with the stop token they ended on."""
    outs = {}
    for kind, _ in _GRAMMAR_CASES:
        params = _params(kind)
        params = SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=160,
                                structured_outputs=params.structured_outputs)
        outs[kind] = [tuple(o.token_ids) for r in plain.generate(PROMPTS, params, use_tqdm=False) for o in r.outputs]
    return outs
