"""render_chat's character budget: a template's output is cut off as it passes max_chars, not rendered whole first."""

from __future__ import annotations

import pytest

from pllm.models.chat_template import ChatPromptTooLong, max_prompt_chars, render_chat

CONV = [{"role": "user", "content": "hello"}]
LOOP = "{% for i in range(100000) %}{{ piece() }}{% endfor %}"


def counting_piece(text: str):
    calls = []

    def piece() -> str:
        calls.append(1)
        return text

    return piece, calls


def test_a_template_looping_past_the_budget_stops_there():
    """100,000 pieces of 100 characters (10 MB) against a budget of 1,000: the error comes after the 11th piece, so
    the template's loop never ran on (render() would have made all 100,000 first)."""
    piece, calls = counting_piece("x" * 100)
    with pytest.raises(ChatPromptTooLong, match="more than 1000 characters") as info:
        render_chat(LOOP, CONV, {}, piece=piece, max_chars=1000)
    assert info.value.max_chars == 1000 and isinstance(info.value, ValueError)  # the server's 400, LLM.chat's error
    assert len(calls) == 11


def test_the_budget_is_inclusive_and_changes_nothing_below_it():
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    text = render_chat(template, CONV, {})
    assert text == "<user>hello"
    assert render_chat(template, CONV, {}, max_chars=len(text)) == text
    with pytest.raises(ChatPromptTooLong):
        render_chat(template, CONV, {}, max_chars=len(text) - 1)
    assert render_chat(template, CONV, {}, max_chars=None) == text  # no budget: as before


def test_the_budget_is_what_max_model_len_tokens_can_hold():
    class Vocab:
        def get_vocab(self):
            return {"a": 0, "abcd": 1, "ab": 2}

    assert max_prompt_chars(Vocab(), 100) == 400
