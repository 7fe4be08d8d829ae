"""Regexes and JSON-schema patterns: every output valid UTF-8, a match, and (in a JSON string) valid JSON."""

from __future__ import annotations

import json
import re

import pytest

from pllm import LLM, SamplingParams, StructuredOutputsParams
from pllm.runtime.engine.regex_grammar import regex_to_ebnf
from pllm.runtime.engine.structured_output import GrammarError

# byte sequences that are not UTF-8: a surrogate (U+DC3C), overlong encodings (of U+0000), above U+10FFFF
NOT_UTF8 = [b"\xed\xb0\xbc", b"\xc0\x80", b"\xe0\x80\x80", b"\xf0\x80\x80\x80", b"\xf4\x90\x80\x80", b"\xff"]
WIDE = [".", r"[\s\S]", "[^a]", r"\D", r"\S", r"[\u0000-\U0010FFFF]"]


@pytest.fixture(scope="module")
def llm(build):
    return LLM(build, backend="cpu", kv_cache_memory=1 << 24)


@pytest.fixture(scope="module")
def vocab(llm) -> list[bytes]:
    """Each token's bytes, as xgrammar reads the vocabulary."""
    import xgrammar as xgr

    from pllm.runtime.worker.text_loader import transformers_tokenizer

    return xgr.TokenizerInfo.from_huggingface(transformers_tokenizer(llm.tokenizer)).decoded_vocab


def grammar(llm, spec: StructuredOutputsParams):
    return llm.engine.grammars.compile(spec).result()


def takes_bytes(llm, vocab, compiled, data: bytes) -> bool:
    """Whether the grammar lets the model write data one single-byte token at a time, as a byte-level vocabulary
    allows (the bitmask, which the sampler reads, not just accept_token)."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiled)
    ids = {v[0]: i for i, v in enumerate(vocab) if len(v) == 1}
    bitmask = xgr.allocate_token_bitmask(1, llm.engine.grammars.vocab_size)
    for b in data:
        matcher.fill_next_token_bitmask(bitmask, 0)
        t = ids[b]
        if not (int(bitmask[0, t // 32]) >> (t % 32)) & 1:
            return False
        assert matcher.accept_token(t)
    return True


@pytest.mark.parametrize("regex", WIDE)
def test_wide_regex_classes_refuse_bytes_that_are_not_utf8(llm, vocab, regex):
    compiled = grammar(llm, StructuredOutputsParams(regex=regex))
    assert takes_bytes(llm, vocab, compiled, "é".encode()) and takes_bytes(llm, vocab, compiled, "😀".encode())
    for bad in NOT_UTF8:
        assert not takes_bytes(llm, vocab, compiled, bad), (regex, bad)


@pytest.mark.parametrize("regex", WIDE)
def test_wide_pattern_classes_refuse_bytes_that_are_not_utf8(llm, vocab, regex):
    compiled = grammar(llm, StructuredOutputsParams(json={"type": "string", "pattern": f"^{regex}{{3}}$"}))
    assert takes_bytes(llm, vocab, compiled, '"é😀'.encode())
    for bad in NOT_UTF8:
        assert not takes_bytes(llm, vocab, compiled, b'"' + bad), (regex, bad)


@pytest.mark.parametrize("pattern, good, bad", [
    (r"^\\$", [r'"\\"'], ['"\\"']),  # one backslash, written escaped
    ('^["a]{2}$', [r'"\"a"', '"aa"'], ['"""a"']),
    (r"^[\s\S]{2}$", [r'"\n\t"', r'"\"\\"', r'"\u0001x"', '"é "'], ['"\n\t"', '"\x01x"']),
    ("^a\nb$", [r'"a\nb"'], ['"a\nb"']),
])
def test_patterns_are_written_as_json_strings(llm, vocab, pattern, good, bad):
    """A pattern constrains the string's value: what JSON must escape is written escaped, never raw."""
    compiled = grammar(llm, StructuredOutputsParams(json={"type": "string", "pattern": pattern}))
    for text in good:
        assert json.loads(text) is not None and re.fullmatch(pattern, json.loads(text)), text
        assert takes_bytes(llm, vocab, compiled, text.encode()), text
    for text in bad:
        assert not takes_bytes(llm, vocab, compiled, text.encode()), text


def test_patterns_inside_objects_and_property_names(llm, vocab):
    schema = {"type": "object", "properties": {"k": {"type": "string", "pattern": "^[^x]{1,3}$"},
                                               "c": {"const": {"pattern": "[^x]"}}},
              "required": ["k", "c"], "patternProperties": {"^z[0-9]$": {"type": "integer"}}}
    compiled = grammar(llm, StructuredOutputsParams(json=schema))
    assert takes_bytes(llm, vocab, compiled, b'{"k": "\\"", "c": {"pattern":"[^x]"}, "z7": 1}')
    assert not takes_bytes(llm, vocab, compiled, b'{"k": "x')
    assert not takes_bytes(llm, vocab, compiled, b'{"k": "a", "c": {"pattern":"[^x]"}, "zz')


def test_sampled_outputs_are_utf8_and_match(llm, vocab):
    """Sampled hot (temperature 2): before the fix a few in 64 of these held encoded surrogates."""
    eos = llm.tokenizer.eos_token_id
    for spec, regex in [(StructuredOutputsParams(json={"type": "string", "pattern": r"^[\s\S]{2,6}$"}), None),
                        (StructuredOutputsParams(regex=r"[\s\S]{6}"), r"[\s\S]{6}"),
                        (StructuredOutputsParams(regex=".{6}"), ".{6}")]:
        params = SamplingParams(n=24, max_tokens=40, temperature=2.0, seed=5, structured_outputs=spec)
        for o in llm.generate(["x"], params, use_tqdm=False)[0].outputs:
            data = b"".join(vocab[i] for i in o.token_ids if i != eos)
            text = data.decode("utf-8")  # raises on bytes that are not UTF-8
            if regex is None:
                assert o.finish_reason == "stop" and re.fullmatch(r"[\s\S]{2,6}", json.loads(text)), text
            else:
                assert re.fullmatch(regex, text), text


@pytest.mark.parametrize("regex, needle", [
    ("(abc", "parenthesis"),  # xgrammar's own refusal comes first, with its message
    ("a(?=b)", "not supported"),
    (r"(a)\1", "not supported"),
    (r"[\ud800-\udfff]", "no character UTF-8 can encode"),
])
def test_regexes_that_cannot_be_written_are_refused_naming_the_field(llm, vocab, regex, needle):
    with pytest.raises(GrammarError, match=needle) as info:
        grammar(llm, StructuredOutputsParams(regex=regex))
    assert info.value.param == "structured_outputs.regex"
    with pytest.raises(GrammarError, match=needle) as info:
        grammar(llm, StructuredOutputsParams(json={"type": "string", "pattern": regex}))
    assert info.value.param == "structured_outputs.json"


def test_classes_follow_ecma_262():
    """\\d, \\w and \\s are ECMA-262's (JSON Schema's regex dialect, and xgrammar's); `.` stops at line ends (but
    for surrogates, which UTF-8 cannot encode)."""
    assert regex_to_ebnf(r"\d") == r"[\u0030-\u0039]"
    assert regex_to_ebnf(r"\w") == r"[\u0030-\u0039\u0041-\u005a\u005f\u0061-\u007a]"
    assert regex_to_ebnf(".") == r"[\u0000-\u0009\u000b-\u000c\u000e-\u2027\u202a-\ud7ff\ue000-\U0010ffff]"
    assert regex_to_ebnf("^ab|c$") == '("ab" | "c")'
