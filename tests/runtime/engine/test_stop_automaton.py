"""StopStringMatcher's automaton: the same cuts as the rescanning matcher it replaced, at a cost per character that
does not grow with the stop strings."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pllm.runtime.engine.detokenizer import StopAutomaton, StopStringMatcher
from pllm.runtime.engine.sampling_params import MAX_STOP_STRING_LEN, MAX_STOP_STRINGS


class RescanningMatcher:
    """The matcher before the automaton, kept as the reference: it rescans every stop string at each feed."""

    def __init__(self, stop_strings: tuple[str, ...], include_stop_str_in_output: bool) -> None:
        self.stop_strings = tuple(stop_strings)
        self.include_stop_str_in_output = include_stop_str_in_output
        self._held = ""
        self._num_held_unstoppable = 0
        self.stopped = False
        self.stop_string: str | None = None

    def feed(self, delta: str, can_stop: bool = True) -> tuple[str, bool]:
        if not self.stop_strings:
            return delta, False
        text = self._held + delta
        num_unstoppable = self._num_held_unstoppable if can_stop else len(text)
        hit = self._first_hit(text, num_unstoppable) if can_stop else None
        if hit is not None:
            start, stop = hit
            self.stopped = True
            self.stop_string = text[start:stop]
            self._held = ""
            return text[: stop if self.include_stop_str_in_output else start], True
        num_held = self._num_tail_held(text)
        self._held = text[len(text) - num_held :]
        self._num_held_unstoppable = max(num_unstoppable - (len(text) - num_held), 0)
        return text[: len(text) - num_held], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        self._num_held_unstoppable = 0
        return held

    def _first_hit(self, text: str, num_unstoppable: int = 0) -> tuple[int, int] | None:
        for s in self.stop_strings:
            start = text.find(s, max(num_unstoppable - len(s) + 1, 0))
            if start >= 0:
                return start, start + len(s)
        return None

    def _num_tail_held(self, text: str) -> int:
        num_held = 0
        for s in self.stop_strings:
            for length in range(min(len(s) - 1, len(text)), num_held, -1):
                if text.endswith(s[:length]):
                    num_held = length
                    break
        return num_held


def run(matcher, pieces: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Each piece's (emitted text, hit), then the flush's text when nothing hit."""
    out = []
    for delta, can_stop in pieces:
        emitted, hit = matcher.feed(delta, can_stop)
        out.append((emitted, hit))
        if hit:
            return out
    out.append((matcher.flush(), False))
    return out


# few letters, so stop strings overlap, nest, repeat and share prefixes; "é" and an emoji as whole characters
ALPHABET = "abcé\U0001f600"


@settings(max_examples=200, deadline=None)
@given(
    stops=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=6), max_size=5),
    text=st.text(alphabet=ALPHABET, max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=12),
    can_stop=st.lists(st.booleans(), min_size=13, max_size=13),
    num_unstoppable=st.integers(0, 13),
    include=st.booleans(),
)
def test_the_automaton_cuts_as_the_rescanning_matcher(stops, text, cuts, can_stop, num_unstoppable, include):
    """Random stop sets and texts split into random pieces (one a token): every piece emits the same text, hits the
    same stop string, and the flush releases the same tail. The first pieces are min_tokens' (no hit may end in
    them); the rest take random flags too, which the matcher allows."""
    stops = tuple(stops)
    points = sorted({min(c, len(text)) for c in cuts})
    deltas = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    pieces = [(d, i >= num_unstoppable and flag) for i, (d, flag) in enumerate(zip(deltas, can_stop))]
    matcher = StopStringMatcher(stops, include)
    assert run(matcher, pieces) == run(reference := RescanningMatcher(stops, include), pieces)
    assert (matcher.stopped, matcher.stop_string) == (reference.stopped, reference.stop_string)
    assert matcher.num_steps <= 2 * len(text)  # each character: one edge, plus failure links it paid for


def test_a_stop_string_that_is_a_suffix_of_another_hits_through_the_failure_links():
    m = StopStringMatcher(("bc", "abcd"), False)
    assert m.feed("xab") == ("x", False)  # "ab" may grow into "abcd"
    assert m.feed("c") == ("a", True) and m.stop_string == "bc"  # "abc" is no stop string; its suffix "bc" is


def stop_sets() -> list[tuple[str, ...]]:
    """From one short stop string to the limits (16 of 256 characters), all near-misses of the text fed below:
    a long run of "a" then a letter, so each character walks deep into the trie and every string stays a candidate."""
    sets = []
    for num_stops, length in ((1, 8), (4, 64), (MAX_STOP_STRINGS, MAX_STOP_STRING_LEN)):
        letters = string.ascii_lowercase[1 : num_stops + 1]
        sets.append(tuple("a" * (length - 1) + c for c in letters))
    return sets


@pytest.mark.parametrize("token_text", ["a", "aaaa", "aaab"])
def test_steps_per_token_do_not_grow_with_the_stop_strings(token_text):
    """The old matcher's work per token grew with the stop strings' total length (each one searched and each
    prefix compared at every token: 369 us a token at 16 x 256); the automaton's is at most two steps per character
    fed, here at every token and at every stop-set size, so a token's cost is bounded by its own text."""
    for stops in stop_sets():
        matcher = StopStringMatcher(stops, False)
        for _ in range(1000):  # no hit: every stop string ends in a letter past "a"
            before = matcher.num_steps
            assert matcher.feed(token_text)[1] is False
            assert matcher.num_steps - before <= 2 * len(token_text), (len(stops), matcher.num_steps - before)
        assert len(matcher.flush()) < len(stops[0])  # only a tail that could still become a stop string was held


def test_building_the_automaton_is_linear_in_the_stop_strings():
    """Every state is one character of some stop string (the trie), so the largest set allowed has at most
    16 x 256 states, built once per request and shared by its n sequences."""
    stops = stop_sets()[-1]
    automaton = StopAutomaton.build(stops)
    assert len(automaton.goto) <= 1 + sum(map(len, stops))
    assert StopStringMatcher(stops, False)._automaton is StopStringMatcher(stops, True)._automaton
