"""How each kind of structured output compiles with xgrammar: JSON schemas (with corrections to the library's JSON
strings and the patterns it gets wrong), regexes, choices, EBNF grammars. No torch: the grammar process
(grammar_process.py) runs it apart from the engine."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from pllm.runtime.engine.regex_grammar import regex_to_ebnf
from pllm.runtime.engine.schema_rewrite import REGEX_NODE, map_schemas, mark_patterns

# Optional object properties (not in `required`) are what makes xgrammar 0.2.9 slow to compile a JSON schema: each
# is a rule listing the later ones, ~3 ms apiece on one core here, more past a few hundred in one object (2,000 in
# one object, an 18 KB schema: 19 s; 30 objects of 256: 22 s), in the grammar process every structured request
# waits on (GRAMMAR_COMPILE_TIMEOUT_S bounds it). Required properties, enums, anyOf and items cost far less (a 64 KiB
# schema of them compiles in < 0.5 s).
MAX_OPTIONAL_PROPERTIES = 1024  # in the whole schema, each object as often as it is written out
# xgrammar's errors start with a timestamp and its C++ source location: neither helps a client
_XGRAMMAR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: (Check failed: \(.*?\) is false: )?")


class GrammarRefused(ValueError):
    """xgrammar refused a spec: the message is its own words, for the client."""


# Two character classes of xgrammar 0.2.9's JSON strings, corrected: (1) a string with minLength/maxLength is
# counted characters of the first, which lets raw control characters through (JSON forbids them unescaped, and
# json.loads refuses them); (2) both admit the UTF-8 encoding of surrogates (U+D800-U+DFFF), which is not UTF-8:
# the text decodes to three U+FFFD each, breaking maxLength. Applied to the grammar as printed.
_STRING_CHAR_FIXES = (
    (r'[^\"\\\r\n]', r'[^\"\\\0-\x1f\ud800-\udfff]'),
    (r'[^\0-\x1f\"\\\r\n]', r'[^\0-\x1f\"\\\ud800-\udfff]'),
)
# Fixing that means printing the grammar and parsing it back, and its printer writes U+0080-U+00FF as \xHH, which
# its parser reads greedily (\x800 is U+0800): rewritten as \u00HH (a backslash run of even length is literal).
_HEX_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\x([0-9a-fA-F]{2})")


def _json_grammar(compiler: Any, schema: dict, strict: bool) -> Any:
    import xgrammar as xgr

    # Compact JSON (no free whitespace between tokens): a model cannot stall in an endless run of spaces, and the
    # output is what json.dumps(..., separators=(", ", ": ")) writes. Strict: no properties beyond the schema's.
    _check_optional_properties(schema)
    marked, patterns = mark_patterns(schema)
    grammar = xgr.Grammar.from_json_schema(json.dumps(marked), any_whitespace=False, strict_mode=strict)
    text = str(grammar)
    for wrong, right in _STRING_CHAR_FIXES:
        text = text.replace(wrong, right)
    text = _HEX_ESCAPE.sub(r"\1\\u00\2", text)
    for marker, regex in patterns.items():  # the patterns xgrammar 0.2.9 gets wrong, written by regex_grammar
        node = REGEX_NODE.format(marker)
        if node in text:
            text = text.replace(node, f"({regex_to_ebnf(regex, json_string=True)})")
    return compiler.compile_grammar(text)


def _check_optional_properties(schema: dict) -> None:
    """A ValueError when the schema's objects hold more than MAX_OPTIONAL_PROPERTIES optional properties in all."""
    count = 0

    def add(s: dict) -> dict:
        nonlocal count
        properties = s.get("properties")
        if isinstance(properties, dict):
            required = s.get("required")
            required = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
            count += len(set(properties) - required)
        return s

    map_schemas(schema, add)
    if count > MAX_OPTIONAL_PROPERTIES:
        raise ValueError(f"the schema has {count} optional object properties (not in `required`), more than the "
                         f"limit of {MAX_OPTIONAL_PROPERTIES} (MAX_OPTIONAL_PROPERTIES)")


def _regex(compiler: Any, regex: str) -> Any:
    return compiler.compile_grammar(f"root ::= {regex_to_ebnf(regex)}")


def _choice(compiler: Any, choice: list[str]) -> Any:
    # one EBNF alternative per choice; json.dumps writes a string literal the EBNF parser reads (its escapes)
    alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in choice)
    return compiler.compile_grammar(f"root ::= {alternatives}")


# kind (StructuredOutputsParams.kind) -> how xgrammar compiles that field's value: a new kind is one entry here
GRAMMAR_COMPILERS: dict[str, Callable[[Any, Any], Any]] = {
    "json": lambda compiler, schema: _json_grammar(compiler, schema, strict=True),
    "regex": _regex,
    "choice": _choice,
    "grammar": lambda compiler, grammar: compiler.compile_grammar(grammar),
    # OpenAI's json_object: any JSON object (xgrammar's builtin JSON grammar also admits arrays and scalars)
    "json_object": lambda compiler, _: _json_grammar(compiler, {"type": "object"}, strict=False),
}


def compile_value(compiler: Any, kind: str, value: Any) -> Any:
    """xgrammar's CompiledGrammar for one structured-output field's value; GrammarRefused with the compiler's own
    message (its timestamp and C++ location dropped) for anything it refuses."""
    try:
        return GRAMMAR_COMPILERS[kind](compiler, value)
    except Exception as exc:  # xgrammar reports every refusal as an exception: the input is the client's
        text = str(exc).strip() or type(exc).__name__
        raise GrammarRefused(_XGRAMMAR_PREFIX.sub("", text).splitlines()[0][:500]) from None
