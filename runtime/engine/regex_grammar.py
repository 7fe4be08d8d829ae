"""Regexes (the `regex` kind, and `pattern` in JSON schemas) written out as EBNF here, not by xgrammar 0.2.9.

Its own conversion breaks two promises. Wide classes (`.`, `[\\s\\S]`, `[^a]`, `\\D`) admit the UTF-8 encoding of
surrogates (U+D800-U+DFFF), and in a JSON `pattern` also overlong encodings (E0 80 80): the output is not UTF-8.
And a JSON `pattern` is either written raw into the string (`^\\\\$` gives `"\\"`, `[\\n"]` a raw newline or quote:
not JSON) or, as an FSM, never escaped at all. Here a regex is parsed by Python's own parser and each character
class becomes explicit code point ranges without surrogates; inside a JSON string, the characters JSON must escape
are written escaped. xgrammar still parses every regex first, so what it refuses stays refused, with its message.
"""

from __future__ import annotations

import json
import re
from typing import Any

try:  # Python 3.11+
    from re import _constants as _sre  # type: ignore[attr-defined]
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

Ranges = list[tuple[int, int]]  # sorted, disjoint, inclusive code point ranges

_SCALARS: Ranges = [(0, 0xD7FF), (0xE000, 0x10FFFF)]  # the code points UTF-8 can encode
# JSON Schema's patterns are ECMA-262 regexes: its classes, which are also what xgrammar's own regexes use
_DIGIT: Ranges = [(0x30, 0x39)]
_WORD: Ranges = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE: Ranges = [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
                  (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)]
_LINE_TERMINATORS: Ranges = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]  # what `.` does not match
# inside a JSON string: these may not appear raw, so they are written as their escapes
_JSON_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r"}
_JSON_RAW: Ranges = [(0x20, 0x21), (0x23, 0x5B), (0x5D, 0xD7FF), (0xE000, 0x10FFFF)]


def _normalize(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _complement(ranges: Ranges) -> Ranges:
    out, start = [], 0
    for lo, hi in _normalize(ranges):
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    return out + ([(start, 0x10FFFF)] if start <= 0x10FFFF else [])


def _intersect(a: Ranges, b: Ranges) -> Ranges:
    return _complement(_complement(a) + _complement(b))


_CATEGORIES = {
    _sre.CATEGORY_DIGIT: _DIGIT, _sre.CATEGORY_NOT_DIGIT: _complement(_DIGIT),
    _sre.CATEGORY_WORD: _WORD, _sre.CATEGORY_NOT_WORD: _complement(_WORD),
    _sre.CATEGORY_SPACE: _SPACE, _sre.CATEGORY_NOT_SPACE: _complement(_SPACE),
}
_ANCHORS = {_sre.AT_BEGINNING, _sre.AT_BEGINNING_STRING, _sre.AT_END, _sre.AT_END_STRING}


def _class_ebnf(ranges: Ranges) -> str:
    def char(c: int) -> str:
        return f"\\u{c:04x}" if c <= 0xFFFF else f"\\U{c:08x}"

    return "[" + "".join(char(lo) if lo == hi else f"{char(lo)}-{char(hi)}" for lo, hi in ranges) + "]"


class _Writer:
    """One regex's parse tree as an EBNF expression; json_string: as the inside of a JSON string literal."""

    def __init__(self, json_string: bool) -> None:
        self.json_string = json_string

    def literal(self, chars: list[int]) -> str:
        if any(0xD800 <= c <= 0xDFFF for c in chars):
            raise ValueError("the regex matches a surrogate (U+D800-U+DFFF), which UTF-8 cannot encode")
        text = "".join(chr(c) for c in chars)
        if self.json_string:
            text = json.dumps(text, ensure_ascii=False)[1:-1]
        return json.dumps(text, ensure_ascii=False)  # EBNF string literals take JSON's escapes

    def char_class(self, ranges: Ranges) -> str:
        ranges = _intersect(ranges, _SCALARS)
        if not self.json_string:
            alternatives = [_class_ebnf(ranges)] if ranges else []
        else:
            raw = _intersect(ranges, _JSON_RAW)
            escaped = [c for lo, hi in _intersect(ranges, _complement(_JSON_RAW)) for c in range(lo, hi + 1)]
            alternatives = [_class_ebnf(raw)] if raw else []
            alternatives += [json.dumps(_JSON_ESCAPES.get(c, f"\\u{c:04x}")) for c in escaped]
        if not alternatives:
            raise ValueError("the regex has a character class that matches no character UTF-8 can encode")
        return alternatives[0] if len(alternatives) == 1 else "(" + " | ".join(alternatives) + ")"

    def sequence(self, pattern: Any) -> str:
        parts: list[str] = []
        chars: list[int] = []
        for op, av in pattern:
            if op is _sre.LITERAL:
                chars.append(av)
                continue
            if chars:
                parts.append(self.literal(chars))
                chars = []
            part = self.item(op, av)
            if part:
                parts.append(part)
        if chars:
            parts.append(self.literal(chars))
        return " ".join(parts) if parts else '""'

    def item(self, op: Any, av: Any) -> str:
        if op is _sre.NOT_LITERAL:
            return self.char_class(_complement([(av, av)]))
        if op is _sre.ANY:
            return self.char_class(_complement(_LINE_TERMINATORS))
        if op is _sre.IN:
            return self.char_class(self.class_ranges(av))
        if op is _sre.BRANCH:
            return "(" + " | ".join(self.sequence(p) for p in av[1]) + ")"
        if op is _sre.SUBPATTERN:
            _, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise ValueError("inline flags such as (?i:...) are not supported")
            return "(" + self.sequence(sub) + ")"
        if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):  # lazy or greedy: the same strings match
            low, high, sub = av
            body = "(" + self.sequence(sub) + ")"
            if high is _sre.MAXREPEAT:
                return body + ("*" if low == 0 else "+" if low == 1 else f"{{{low},}}")
            if high == 0:
                return ""
            return body + ("?" if (low, high) == (0, 1) else f"{{{low},{high}}}")
        if op is _sre.AT and av in _ANCHORS:
            return ""  # the whole output must match, as xgrammar reads every regex
        raise ValueError(f"{str(op).lower()} (lookarounds, backreferences, word boundaries, atomic groups, "
                         "possessive repeats) is not supported")

    def class_ranges(self, items: list) -> Ranges:
        ranges: Ranges = []
        negate = False
        for op, av in items:
            if op is _sre.NEGATE:
                negate = True
            elif op is _sre.LITERAL:
                ranges.append((av, av))
            elif op is _sre.RANGE:
                ranges.append(av)
            elif op is _sre.CATEGORY and av in _CATEGORIES:
                ranges += _CATEGORIES[av]
            else:
                raise ValueError(f"{op} {av} in a character class is not supported")
        return _complement(ranges) if negate else _normalize(ranges)


def regex_to_ebnf(regex: str, json_string: bool = False) -> str:
    """An EBNF expression matching the strings regex matches whole, each one valid UTF-8 (json_string: written as
    the inside of a JSON string literal). ValueError for what cannot be written so."""
    import xgrammar as xgr

    xgr.Grammar.from_regex(regex)  # its refusals, with its messages, come first
    try:
        parsed = _sre_parse.parse(regex)
        if parsed.state.flags & ~re.UNICODE:  # xgrammar refuses them too: (?i) would need case folding here
            raise ValueError("flags such as (?i) are not supported")
        return _Writer(json_string).sequence(parsed)
    except re.error as exc:
        raise ValueError(f"invalid regex: {exc}") from None
    except RecursionError:
        raise ValueError("the regex is nested too deeply") from None
