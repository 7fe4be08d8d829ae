"""Strict JSON request bodies: UTF-8 text only, finite numbers only, bounded nesting; errors name the field."""

from __future__ import annotations

import json
import math
from typing import Any

MAX_JSON_DEPTH = 64  # far beyond any OpenAI request (tool schemas nest ~10 deep); keeps every walk shallow


class JSONBodyError(ValueError):
    """A body that is not strict JSON; `param` is the dotted path of the offending field, if there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class _NonFinite:
    """Stands in for NaN, Infinity or an overflowing number until the walk knows which field held it."""

    def __init__(self, literal: str):
        self.literal = literal


def _parse_float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def parse_json_body(body: bytes) -> Any:
    """The decoded body; JSONBodyError for bytes that are not UTF-8, non-finite numbers or over-deep nesting.

    Python's json accepts what OpenAI's API refuses: escaped lone surrogates ("\\ud800"), NaN and Infinity, and
    (when given bytes) surrogates encoded in UTF-8. Invalid bytes are decoded with surrogateescape, so they too
    become lone surrogates, and one walk over the document finds every kind of bad text and names its field.
    """
    text = body.decode("utf-8", "surrogateescape")
    try:
        doc = json.loads(text, parse_constant=_NonFinite, parse_float=_parse_float)
    except json.JSONDecodeError as exc:
        raise JSONBodyError(f"The body is not valid JSON: {exc.msg} at character {exc.pos}.") from None
    except RecursionError:
        raise JSONBodyError(f"The body nests arrays or objects more than {MAX_JSON_DEPTH} levels deep.") from None
    except ValueError:  # the only other failure: an integer literal past Python's 4300-digit limit
        raise JSONBodyError("The body is not valid JSON: a number has too many digits.") from None
    _check(doc)
    return doc


def _is_utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check(doc: Any) -> None:
    # Iterative, so a document as deep as json.loads allows cannot exhaust the stack here.
    stack: list[tuple[Any, tuple[str, ...]]] = [(doc, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            message = f"The body nests arrays or objects more than {MAX_JSON_DEPTH} levels deep."
            raise JSONBodyError(message, _name(path[:1]))
        if isinstance(value, str):
            if not _is_utf8(value):
                raise JSONBodyError(_bad_text(path), _name(path))
        elif isinstance(value, _NonFinite):
            raise JSONBodyError(
                f"{_name(path) or 'body'}: {value.literal[:40]} is not a finite number (JSON has no NaN or Infinity).",
                _name(path),
            )
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _is_utf8(key):
                    raise JSONBodyError(_bad_text(path, "a key"), _name(path))
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            # Numbers need no look (finite floats parse as float): a million token ids build no paths.
            stack.extend((item, (*path, str(i))) for i, item in enumerate(value) if isinstance(item, _CHECKED))


_CHECKED = (str, dict, list, _NonFinite)


def _name(path: tuple[str, ...]) -> str | None:
    return ".".join(path)[:200] if path else None


def _bad_text(path: tuple[str, ...], what: str = "the value") -> str:
    where = _name(path) or "body"
    return (
        f"{where}: {what} is not valid UTF-8 text (it holds a lone UTF-16 surrogate such as \\ud800, "
        "or bytes that are not UTF-8)."
    )
