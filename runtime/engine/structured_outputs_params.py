"""StructuredOutputsParams: the constraint a request puts on its output (vLLM's names), checked and bounded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

from pllm.runtime.engine.param_checks import InvalidParam, bad_param, clip_repr, is_unicode

# structured output: what a client may ask the grammar compiler to do, bounded so one request cannot make
# compilation (run off the engine loop, but on a shared thread) or the grammar cache arbitrarily large
MAX_STRUCTURED_CHARS = 64 * 1024  # a JSON schema (as compact JSON), a regex or a grammar
MAX_SCHEMA_DEPTH = 32  # nesting of objects and lists in a JSON schema
MAX_CHOICES = 256
MAX_CHOICE_LEN = 1024


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output (vLLM's names): set exactly one of json (a JSON schema, as a dict or JSON
    text), regex, choice (the output is one of these strings), grammar (EBNF/GBNF), or json_object (any JSON
    object). Compiled once per distinct spec by the engine's grammar cache."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # a client's spec; a subclass may allow more where something else bounds the spec (a forced tool call's schema)
    max_chars: ClassVar[int] = MAX_STRUCTURED_CHARS

    def __post_init__(self) -> None:
        if isinstance(self.json, str):  # JSON text: parsed here, so a bad document is an error naming the field
            if len(self.json) > MAX_STRUCTURED_CHARS:
                raise bad_param("structured_outputs.json", f"{len(self.json)} characters",
                           f"at most {MAX_STRUCTURED_CHARS} characters")
            try:
                self.json = json.loads(self.json)
            except (ValueError, RecursionError) as exc:
                raise InvalidParam(
                    "structured_outputs.json", f"structured_outputs.json is not valid JSON: {exc}"
                ) from None
        if isinstance(self.choice, tuple):
            self.choice = list(self.choice)
        self.validate()

    @property
    def kind(self) -> str:
        """Which constraint is set: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(name for name in _STRUCTURED_KINDS if getattr(self, name) not in (None, False))

    def key(self) -> tuple[str, str]:
        """A canonical form: equal for specs that compile to the same grammar. Keys of a schema's objects are
        sorted, except under "properties", whose order is the order the output writes them in."""
        kind = self.kind
        if kind == "json":
            return kind, json.dumps(_canonical(self.json), separators=(",", ":"), ensure_ascii=False)
        if kind == "choice":
            return kind, json.dumps(self.choice, ensure_ascii=False)
        return kind, "" if kind == "json_object" else getattr(self, kind)

    def validate(self) -> None:
        named = [name for name in _STRUCTURED_KINDS if getattr(self, name) not in (None, False)]
        if len(named) != 1:
            raise InvalidParam(
                "structured_outputs",
                f"structured_outputs must set exactly one of {', '.join(_STRUCTURED_KINDS)}; got "
                f"{', '.join(named) or 'none'}",
            )
        field_name = f"structured_outputs.{named[0]}"
        if self.json is not None:
            if not isinstance(self.json, dict):
                raise bad_param(field_name, self.json, "a JSON schema: an object, or its JSON text")
            if _depth(self.json) > MAX_SCHEMA_DEPTH:
                raise bad_param(field_name, "a schema", f"nested at most {MAX_SCHEMA_DEPTH} levels deep")
            try:
                size = len(self.key()[1])
            except (TypeError, ValueError) as exc:  # from Python: a value JSON cannot hold
                raise bad_param(field_name, "a schema", f"JSON data ({exc})") from None
            if size > self.max_chars:
                raise bad_param(field_name, f"{size} characters", f"at most {self.max_chars} characters as JSON")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not 0 < len(value) <= MAX_STRUCTURED_CHARS):
                raise bad_param(field_name, clip_repr(value),
                                f"a non-empty string of at most {MAX_STRUCTURED_CHARS} characters")
        if self.choice is not None:
            if not isinstance(self.choice, list) or not 0 < len(self.choice) <= MAX_CHOICES:
                raise bad_param(field_name, clip_repr(self.choice), f"a list of 1 to {MAX_CHOICES} strings")
            for c in self.choice:
                if not isinstance(c, str) or not 0 < len(c) <= MAX_CHOICE_LEN or not is_unicode(c):
                    raise bad_param(field_name, clip_repr(c),
                                    f"non-empty strings of at most {MAX_CHOICE_LEN} characters")
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise bad_param(field_name, self.json_object, "true or false")


_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def _depth(value: object) -> int:
    """Nesting depth of dicts and lists, without recursion (a hostile schema could be deeper than the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_SCHEMA_DEPTH:
                break
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _canonical(value: object, ordered: bool = False) -> object:
    """A schema with its objects' keys sorted, but for the property lists ("properties" values); depth is bounded
    by MAX_SCHEMA_DEPTH before this runs."""
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if not isinstance(value, dict):
        return value
    keys = list(value) if ordered else sorted(value, key=str)
    return {k: _canonical(value[k], ordered=k == "properties" and not ordered) for k in keys}
