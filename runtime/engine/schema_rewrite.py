"""JSON schemas rewritten before xgrammar compiles them: one schema embedded in another (the forced schema of
tool_choice "required"), and regexes set aside to be written by regex_grammar."""

from __future__ import annotations

from collections.abc import Callable

# where a schema holds schemas (JSON Schema 2020-12 and draft 7): only these are walked, so data (const, enum,
# default, examples) is never mistaken for a schema and rewritten
_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
        "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_LIST = ("anyOf", "allOf", "oneOf", "prefixItems", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# xgrammar keeps a pattern it cannot write as EBNF as this node, verbatim, in the grammar it prints
REGEX_NODE = 'Regex("{}", json_string=true)'


def map_schemas(schema: object, fn: Callable[[dict], dict]) -> object:
    """schema with fn applied to every schema in it, innermost first, each a fresh dict (schema is left as it
    was). Recursive: bodies nest at most 64 deep (json_body), schemas at most MAX_SCHEMA_DEPTH."""
    if not isinstance(schema, dict):
        return schema  # true, false, or not a schema at all
    out = {}
    for key, value in schema.items():
        if key in _MAP and isinstance(value, dict):
            value = {name: map_schemas(s, fn) for name, s in value.items()}
        elif key in _LIST and isinstance(value, list):
            value = [map_schemas(s, fn) for s in value]
        elif key in _ONE:
            value = map_schemas(value, fn)
        out[key] = value
    return fn(out)


def embed_schema(schema: dict, name: str, defs: dict) -> dict:
    """A reference to schema, which is put in defs[name] (defs: the "$defs" of the document it goes into), with
    its local references rebased onto it: "#" and "#/$defs/X" mean inside the document what they meant in schema
    alone, rather than the document's root. name must need no escaping in a JSON pointer (no "/" or "~")."""
    target = f"#/$defs/{name}"

    def rebase(s: dict) -> dict:
        ref = s.get("$ref")
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
            s["$ref"] = target + ref[1:]
        return s

    defs[name] = map_schemas(schema, rebase)
    return {"$ref": target}


def mark_patterns(schema: dict) -> tuple[dict, dict[str, str]]:
    """schema with each regex (a string's pattern, a patternProperties name) replaced by a marker, which xgrammar
    prints as REGEX_NODE; and marker -> regex. The markers are plain words, so xgrammar takes them as they are."""
    markers: dict[str, str] = {}  # regex -> marker

    def marker(regex: str) -> str:
        return markers.setdefault(regex, f"pllmpattern{len(markers)}x")

    def mark(s: dict) -> dict:
        if isinstance(s.get("pattern"), str):
            s["pattern"] = marker(s["pattern"])
        if isinstance(s.get("patternProperties"), dict):
            s["patternProperties"] = {marker(k): v for k, v in s["patternProperties"].items()}
        return s

    marked = map_schemas(schema, mark)
    return marked, {m: regex for regex, m in markers.items()}  # type: ignore[return-value]
