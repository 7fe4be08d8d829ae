"""pythonic: Llama 3.2/4 and others answer with a Python list of calls, [get_weather(city="Paris"), ...]."""

from __future__ import annotations

import ast
import re

from pllm.runtime.server.tool_parsers.scan import (
    Malformed,
    PartialCall,
    Scan,
    arguments_json,
    calls_and_content,
    skip_ws,
)

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
OPENERS = {"(": ")", "[": "]", "{": "}"}


class PythonicFormat:
    name = "pythonic"
    # The instruction vLLM's and Meta's pythonic templates give the model.
    template_markers = ("[func_name1(",)
    markup_may_be_special_tokens = False

    def scan(self, text: str, final: bool, memo: dict | None = None) -> Scan:
        i = skip_ws(text, 0)
        opening = _opens_call_list(text, i)
        if opening is None:
            return Scan("" if not final else text)  # undecided: held until it is
        if not opening:
            return Scan(text)
        calls: list[PartialCall] = []
        j = skip_ws(text, i + 1)
        if memo is not None and (saved := memo.get("pythonic")) is not None:
            calls, count, j = saved  # calls an earlier, shorter text already held (the list grows in place)
            del calls[count:]
            j = skip_ws(text, j)
        rest: int | None = j  # where the calls stopped at text that is not (yet) a call
        while (m := NAME.match(text, j)) is not None:
            paren = skip_ws(text, m.end())
            if paren >= len(text) or text[paren] != "(":
                break
            # A call is read only once whole: Python cannot be checked piecewise, and a call that turns out
            # not to parse is content at the end, as nothing of it was sent.
            read = _read_call(text, paren, memo)
            if read is None:
                break
            end, arguments = read
            if arguments is None:
                break
            calls.append(PartialCall(m.group(), arguments))
            j = skip_ws(text, end)
            if j >= len(text) or text[j] != ",":
                rest = None  # the list closes (what follows it is not content), or may still go on
                break
            if memo is not None:
                memo["pythonic"] = (calls, len(calls), j + 1)
            j = rest = skip_ws(text, j + 1)
        return calls_and_content(text, "", tuple(calls), rest, final)


def _opens_call_list(text: str, i: int) -> bool | None:
    """Whether text[i:] opens `[name(`: True, False, or None while it still could."""
    if i >= len(text):
        return None
    if text[i] != "[":
        return False
    j = skip_ws(text, i + 1)
    m = NAME.match(text, j)
    if m is None:
        return None if j >= len(text) else False
    k = skip_ws(text, m.end())
    if k >= len(text):
        return None
    return text[k] == "("


def _read_call(text: str, paren: int, memo: dict | None) -> tuple[int, str | None] | None:
    """The call's arguments from text[paren] == '(' on: (the index after them, their JSON or None when they are
    not keyword arguments of literals); None while they are open. A stream's memo keeps a closed call's reading,
    which a longer text cannot change: a malformed call the stream stopped at is not parsed again each delta."""
    saved = memo.get("python_call") if memo is not None else None
    if saved is not None and saved[0] == paren:
        return saved[1]
    end = _python_args_end(text, paren, memo)
    if end is None:
        return None
    try:
        read = end, _keyword_arguments_json(text[paren:end])
    except Malformed:
        read = end, None
    if memo is not None:
        memo["python_call"] = (paren, read)
    return read


def _python_args_end(text: str, i: int, memo: dict | None = None) -> int | None:
    """text[i] is '(': the index after its matching ')', None if the text ends first. memo (a stream's) keeps
    where a text that ended first stopped, so the next, longer text is read on from there, not again from i."""
    saved = memo.pop("python_args", None) if memo is not None else None  # its stack is read on, so used once
    if saved is not None and saved[0] == i:
        _, j, stack, quote = saved
    else:
        j, stack, quote = i, [], None
    while j < len(text):
        if quote is not None:  # inside a string literal that opened before j
            while j < len(text) and text[j] != quote:
                j += 2 if text[j] == "\\" else 1
            if j >= len(text):
                break
            quote = None
            j += 1
            continue
        c = text[j]
        if c in "'\"":
            quote = c
        elif c in OPENERS:
            stack.append(OPENERS[c])
        elif c in ")]}":
            if not stack or stack.pop() != c:
                return j + 1  # unbalanced: let the parse below reject it
            if not stack:
                return j + 1
        j += 1
    if memo is not None:
        memo["python_args"] = (i, j, stack, quote)  # j may be past the end: an escape's next character
    return None


def _keyword_arguments_json(source: str) -> str:
    """'(city="Paris", days=3)' -> '{"city": "Paris", "days": 3}': keyword arguments of Python literals only
    (float("inf") is not one, but 1e999 reads as inf: arguments_json refuses it, with sets and bytes)."""
    try:
        call = ast.parse("f" + source, mode="eval").body
        if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
            raise Malformed("only keyword arguments")
        if len({k.arg for k in call.keywords}) != len(call.keywords):
            raise Malformed("an argument given twice")  # Python itself refuses f(a=1, a=2)
        arguments = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        raise Malformed("not a call of Python literals") from None
    return arguments_json(arguments)
