"""Structured output: grammars compiled off the engine loop into a bounded cache, and one matcher per sequence."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from pllm.runtime.engine.param_checks import InvalidParam
from pllm.runtime.engine.regex_grammar import regex_to_ebnf
from pllm.runtime.engine.schema_rewrite import REGEX_NODE, map_schemas, mark_patterns
from pllm.runtime.engine.structured_outputs_params import StructuredOutputsParams
from pllm.runtime.worker.text_loader import transformers_tokenizer

logger = logging.getLogger("pllm")

MAX_CACHED_GRAMMARS = 256  # distinct specs kept compiled; the least recently used goes first
# Optional object properties (not in `required`) are what makes xgrammar 0.2.9 slow to compile a JSON schema: each
# is a rule listing the later ones, ~3 ms apiece on one core here, more past a few hundred in one object (2,000 in
# one object, an 18 KB schema: 19 s; 30 objects of 256: 22 s), on the one grammar thread every structured request
# waits on. Required properties, enums, anyOf and items cost far less (a 64 KiB schema of them compiles in < 0.5 s).
MAX_OPTIONAL_PROPERTIES = 1024  # in the whole schema, each object as often as it is written out
# xgrammar's errors start with a timestamp and its C++ source location: neither helps a client
_XGRAMMAR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: (Check failed: \(.*?\) is false: )?")


class GrammarError(InvalidParam):
    """A schema, regex or grammar the compiler refused; param names the field, as for any invalid parameter."""


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


def _regex(compiler: Any, spec: StructuredOutputsParams) -> Any:
    return compiler.compile_grammar(f"root ::= {regex_to_ebnf(spec.regex)}")


def _choice(compiler: Any, spec: StructuredOutputsParams) -> Any:
    # one EBNF alternative per choice; json.dumps writes a string literal the EBNF parser reads (its escapes)
    alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
    return compiler.compile_grammar(f"root ::= {alternatives}")


# kind (StructuredOutputsParams.kind) -> how xgrammar compiles it: a new kind is one entry here
GRAMMAR_COMPILERS: dict[str, Callable[[Any, StructuredOutputsParams], Any]] = {
    "json": lambda compiler, spec: _json_grammar(compiler, spec.json, strict=True),
    "regex": _regex,
    "choice": _choice,
    "grammar": lambda compiler, spec: compiler.compile_grammar(spec.grammar),
    # OpenAI's json_object: any JSON object (xgrammar's builtin JSON grammar also admits arrays and scalars)
    "json_object": lambda compiler, spec: _json_grammar(compiler, {"type": "object"}, strict=False),
}


class GrammarCache:
    """Compiles each distinct spec once (keyed by its canonical form), on a worker thread, keeping the most recently
    used MAX_CACHED_GRAMMARS. compile() returns at once with a future; the engine loop never waits on it: a request
    whose grammar is not ready stays in the waiting queue while the rest of the batch steps. Thread-safe: the HTTP
    layer compiles before queueing (so a bad schema is a 400 at once), the engine thread when a request arrives."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...],
                 max_entries: int = MAX_CACHED_GRAMMARS) -> None:
        self.vocab_size = vocab_size  # the logits' width, which may exceed the tokenizer's vocabulary
        self.max_entries = max_entries
        self._tokenizer = tokenizer
        self._stop_token_ids = list(stop_token_ids)
        self._compiler: Any = None  # made on the worker thread by the first compile: the vocabulary scan takes time
        self._entries: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pllm-grammar")
        self.num_compiled = 0  # compilations started (cache misses), for tests and metrics

    def compile(self, spec: StructuredOutputsParams) -> Future:
        """A future of the compiled grammar; its exception is a GrammarError naming the field."""
        key = spec.key()
        with self._lock:
            future = self._entries.get(key)
            if future is not None:
                self._entries.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, spec)
            self.num_compiled += 1
            self._entries[key] = future
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)  # requests holding the future keep their grammar
        return future

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        compiler = self._get_compiler()
        kind = spec.kind
        try:
            return GRAMMAR_COMPILERS[kind](compiler, spec)
        except Exception as exc:  # xgrammar reports every refusal as an exception: the input is the client's
            text = str(exc).strip() or type(exc).__name__
            message = _XGRAMMAR_PREFIX.sub("", text).splitlines()[0][:500]
            raise GrammarError(f"structured_outputs.{kind}", f"structured_outputs.{kind} could not be compiled: "
                               f"{message}") from None

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            import xgrammar as xgr  # lazily: pllm imports, and serves free text, without it

            info = xgr.TokenizerInfo.from_huggingface(
                transformers_tokenizer(self._tokenizer), vocab_size=self.vocab_size, stop_token_ids=self._stop_token_ids
            )
            # our cache replaces xgrammar's (keyed by canonical spec, bounded in entries)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class GrammarState:
    """What the sampler reads of a matcher at one position: the tokens allowed next, and whether EOS is."""

    bitmask: torch.Tensor | None  # [ceil(vocab_size / 32)] int32, bit t set when token t is allowed; None: all are
    can_end: bool  # the output up to here is a complete match


class SequenceGrammar:
    """One sequence's place in its grammar: a matcher made once the compiled grammar is ready, advanced with every
    token the sequence outputs. Preemption by recompute keeps the output tokens, so the matcher, which has accepted
    exactly those, stays valid; were it ever rebuilt, start() replays them. Speculative decoding walks it over a
    step's guesses and rolls it back (valid_prefix, states_along): between steps it holds the output tokens only."""

    def __init__(self, future: Future, vocab_size: int) -> None:
        self._future = future
        self._vocab_size = vocab_size
        self._matcher: Any = None
        self.num_accepted = 0
        self.rejected = False  # a token the grammar refused reached it (a bug upstream): the sequence stops

    @property
    def ready(self) -> bool:
        """The compiled grammar is available (or failed): the scheduler may admit the sequence."""
        return self._future.done()

    def error(self) -> GrammarError | None:
        return self._future.exception() if self._future.done() else None  # type: ignore[return-value]

    def start(self, output_token_ids: list[int]) -> None:
        import xgrammar as xgr

        # rollback has no bound (xgrammar 0.2's max_rollback_tokens is deprecated, always unlimited)
        self._matcher = xgr.GrammarMatcher(self._future.result())
        self.num_accepted = 0
        for token_id in output_token_ids:
            self.accept(token_id)

    @property
    def matcher(self) -> Any:
        if self._matcher is None:
            self.start([])
        return self._matcher

    def accept(self, token_id: int) -> None:
        if not self.matcher.accept_token(token_id):
            logger.error("structured output: token %d was outside the grammar; stopping the sequence", token_id)
            self.rejected = True
        self.num_accepted += 1

    @property
    def finished(self) -> bool:
        """The grammar accepted its stop token (EOS), or was broken: either way the sequence ends here."""
        return self.rejected or (self._matcher is not None and self._matcher.is_terminated())

    @property
    def can_end(self) -> bool:
        """The output so far is a complete match: EOS is allowed now (and is all a finished JSON value allows)."""
        return self.matcher.is_completed()

    def next_token_bitmask(self) -> torch.Tensor | None:
        """[ceil(vocab_size / 32)] int32, bit t set when token t is allowed next; None when every token is."""
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(1, self._vocab_size)  # [1, ceil(vocab_size / 32)]
        if not self.matcher.fill_next_token_bitmask(bitmask, 0):
            return None
        return bitmask[0]

    def state(self) -> GrammarState:
        """The matcher's state now, as the sampler reads it."""
        return GrammarState(self.next_token_bitmask(), self.can_end)

    def valid_prefix(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of token_ids (a step's guesses) the grammar takes in order without ending: a
        guess it refuses, or one that would terminate it (its stop token: nothing may be guessed past it), cuts
        the guesses there. The matcher is left as it was."""
        matcher = self.matcher
        if self.finished:
            return 0
        taken = 0
        for token_id in token_ids:
            if not matcher.accept_token(token_id):
                break
            taken += 1
            if matcher.is_terminated():
                taken -= 1
                self._rollback(taken + 1)
                return taken
        self._rollback(taken)
        return taken

    def states_along(self, token_ids: Sequence[int]) -> tuple[GrammarState, ...]:
        """[len(token_ids) + 1] the state before each guess and after the last: state j is the matcher's after
        accepting token_ids[:j] (a verify step's row j). Every guess must be one valid_prefix kept; the matcher
        is left as it was."""
        matcher = self.matcher
        states = [self.state()]
        for token_id in token_ids:
            if not matcher.accept_token(token_id):
                self._rollback(len(states) - 1)
                raise ValueError(f"guess {token_id} is outside the grammar: valid_prefix should have cut it")
            states.append(self.state())
        self._rollback(len(token_ids))
        return tuple(states)

    def _rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self._matcher.rollback(num_tokens)
