"""Incremental detokenisation (multi-byte safe) and stop-string matching for streamed output text."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import lru_cache

# How many prompt tokens the first window looks back over, so the first output token decodes in context
# (a leading-space or merge rule that depends on the token before it); vLLM uses the same number.
NUM_INITIAL_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns output tokens into text deltas, one token at a time (vLLM's / TGI's prefix-and-read-offset method).

    It decodes a small window, `ids[prefix_offset:]`, and emits what it adds to the decoded
    `ids[prefix_offset:read_offset]`. Decoding a window rather than a lone token keeps the context that
    tokenizers use to place spaces. While the window's text ends in U+FFFD, a multi-byte character is still
    split across tokens, so nothing is emitted until a later token completes it. `flush()` releases whatever is
    still held back when the request finishes (an incomplete character then shows as U+FFFD, as decode shows it).

    With an empty prompt the concatenated deltas plus flush() equal
    `tokenizer.decode(output_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`; with a prompt
    they equal the decoded continuation of the prompt (the same for byte-level BPE whenever the prompt ends on
    a whole character). A prompt ending inside a character gives no context for the output's first bytes: they
    show as decode(output_ids) shows them. Tokenization-space clean-up is off because it rewrites text across
    window boundaries.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._token_ids = list(prompt_token_ids[-NUM_INITIAL_CONTEXT_TOKENS:])  # context tail + output tokens
        # A prompt that ends inside a character (given as token ids) leaves no context for the output's first
        # bytes to join: decoded with it, they would complete a character the prompt started, and the deltas
        # (cut by length from text that no longer extends the context's) would lose or garble output text. So
        # the context ends at the prompt's last whole character, and those bytes show as decode shows them alone.
        while self._token_ids and self._decode(self._token_ids).endswith(REPLACEMENT_CHAR):
            self._token_ids.pop()
        self._num_context = len(self._token_ids)  # prompt tokens at the front of the window until it first moves
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = len(self._token_ids)  # tokens before this have been emitted
        self.num_output_tokens = 0
        self.text = ""  # everything emitted so far

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(
            token_ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def add(self, token_id: int) -> str:
        """Append one output token; return the text it completes (possibly "")."""
        self._token_ids.append(token_id)
        self.num_output_tokens += 1
        return self._advance(final=False)

    def flush(self) -> str:
        """At finish: return the text still held back (an unfinished multi-byte character shows as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self._token_ids):
            return ""
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._token_ids[self._prefix_offset :])
        if self._num_context and not new_text.startswith(prefix_text):
            # the output rewrote the context's text (a byte-fallback decoder turns a whole run of byte tokens into
            # U+FFFD when the output's bytes make it invalid UTF-8): decode the output without context, as
            # decode(output ids) shows it, rather than cut a delta from text that does not extend the context's
            del self._token_ids[: self._num_context]
            self._num_context = self._read_offset = 0
            prefix_text, new_text = "", self._decode(self._token_ids)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR)):
            return ""  # an unfinished character, or a token with no text yet (a skipped special token)
        if new_text.startswith(prefix_text):
            delta = new_text[len(prefix_text) :]
        else:
            # the new tokens rewrote text already emitted (byte-fallback: a valid run of byte tokens followed by
            # bytes that make it invalid turns wholly into U+FFFD in decode), which a stream cannot take back:
            # the new tokens' own text, as vLLM's detokenizer restarts from the token when its prefix breaks
            delta = self._decode(self._token_ids[self._read_offset :])
        self._num_context = 0
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        self.text += delta
        return delta


@dataclass(frozen=True)
class StopAutomaton:
    """Aho-Corasick automaton over one request's stop strings: a trie of them, each state standing for the text of
    its path, with a failure link to the state of that text's longest proper suffix in the trie. Read-only once
    built, so the n sequences of a request share one (stop_automaton caches the latest few)."""

    stop_strings: tuple[str, ...]
    goto: tuple[dict[str, int], ...]  # [num_states] the trie's edges: state -> {character: child state}
    fail: tuple[int, ...]  # [num_states] the state of the longest proper suffix of this state's text in the trie
    # [num_states] index (in stop_strings) of the first stop string, in list order, that is a suffix of this
    # state's text (it, or one reached by failure links); None where none is
    first_stop: tuple[int | None, ...]
    # [num_states] the longest suffix of this state's text that is a proper prefix of some stop string: this
    # state's length when it has children, else its failure state's
    num_held: tuple[int, ...]

    @classmethod
    def build(cls, stop_strings: tuple[str, ...]) -> StopAutomaton:
        """O(total length of the stop strings): each string walked into the trie, then one breadth-first pass."""
        goto: list[dict[str, int]] = [{}]
        depth, own = [0], [None]  # own: the first stop string (list order) whose text this state is
        for index, s in enumerate(stop_strings):
            state = 0
            for char in s:
                child = goto[state].get(char)
                if child is None:
                    child = goto[state][char] = len(goto)
                    goto.append({})
                    depth.append(depth[state] + 1)
                    own.append(None)
                state = child
            if own[state] is None:
                own[state] = index
        fail, first_stop, num_held = [0] * len(goto), list(own), [0] * len(goto)
        queue = deque([0])
        while queue:  # breadth-first: a state's failure state is shallower, so already final
            state = queue.popleft()
            suffix = fail[state]
            if state and first_stop[suffix] is not None and (own[state] is None or first_stop[suffix] < own[state]):
                first_stop[state] = first_stop[suffix]
            num_held[state] = depth[state] if goto[state] else num_held[suffix]
            for char, child in goto[state].items():
                if state:
                    f = suffix
                    while f and char not in goto[f]:
                        f = fail[f]
                    fail[child] = goto[f].get(char, 0)
                queue.append(child)
        return cls(tuple(stop_strings), tuple(goto), tuple(fail), tuple(first_stop), tuple(num_held))


@lru_cache(maxsize=4)
def stop_automaton(stop_strings: tuple[str, ...]) -> StopAutomaton:
    """The automaton of these stop strings, built once for the n sequences of a request (they ask in a row)."""
    return StopAutomaton.build(stop_strings)


class StopStringMatcher:
    """Cuts streamed text at the first stop string (vLLM's choice of it), never emitting part of that one.

    "First" is vLLM's: each `feed` is one token's text, and the text is cut at the first stop string, in the
    order given, that has an occurrence ending in that text (its leftmost such occurrence). Stop strings that
    complete in the text of different tokens are hit in the order the tokens come; where several complete in
    the text of one token, the list order decides, not which completes first. `feed` holds back the longest tail
    of the text that could still grow into a stop string; on a hit it returns the text up to the stop string
    (through it when include_stop_str_in_output) and drops the rest. `flush` releases the held-back tail at
    finish.

    Matching runs the stop strings' Aho-Corasick automaton over each new character, so a feed costs O(its text)
    automaton steps, amortised over the sequence (one edge per character, plus failure links, which never
    outnumber the characters fed), whatever the number and length of the stop strings: `num_steps` counts them.
    Rescanning every stop string at each token instead cost O(their total length) a token (369 us at 16 x 256).
    """

    def __init__(self, stop_strings: tuple[str, ...], include_stop_str_in_output: bool) -> None:
        assert all(stop_strings), "stop strings must be non-empty"
        self.stop_strings = tuple(stop_strings)
        self.include_stop_str_in_output = include_stop_str_in_output
        self._automaton = stop_automaton(self.stop_strings)
        self._state = 0  # the automaton's state after all the text fed: the longest suffix of it in the trie
        # text not yet emitted: the longest tail of the text fed that is a proper prefix of some stop string. No
        # stop string can end in it where one could stop (that would have been a hit), and one that ends in later
        # text starts in it at the earliest, so a hit is always an occurrence ending in the text just fed.
        self._held = ""
        self.num_steps = 0  # automaton steps taken (edges and failure links followed): at most 2 per character fed
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that was hit

    def feed(self, delta: str, can_stop: bool = True) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, whether a stop string was hit). can_stop False: the text of
        an output token within min_tokens, where no stop string may end (vLLM's rule); one may still start in it."""
        assert not self.stopped, "feed after a stop string was hit"
        if not self.stop_strings:
            return delta, False
        automaton = self._automaton
        goto, fail, first_stop = automaton.goto, automaton.fail, automaton.first_stop
        state, num_steps = self._state, len(delta)
        best: int | None = None  # the first stop string (list order) ending in delta so far, and where it first ends
        best_end = 0
        for i, char in enumerate(delta):
            while state and char not in goto[state]:
                state = fail[state]
                num_steps += 1
            state = goto[state].get(char, 0)
            if can_stop:
                found = first_stop[state]
                # a stop string's first end in delta is its leftmost occurrence ending there
                if found is not None and (best is None or found < best):
                    best, best_end = found, i + 1
                    if found == 0:
                        break  # nothing comes before the first stop string
        self._state = state
        self.num_steps += num_steps
        held = self._held
        if best is not None:
            stop = self.stop_strings[best]
            end = len(held) + best_end  # in held + delta, where the leftmost occurrence starts at end - len(stop)
            self.stopped, self.stop_string, self._held = True, stop, ""
            return (held + delta)[: end if self.include_stop_str_in_output else end - len(stop)], True
        num_held = automaton.num_held[state]
        if num_held <= len(delta):
            self._held = delta[len(delta) - num_held :]
            return held + delta[: len(delta) - num_held], False
        num_kept = num_held - len(delta)  # of the old held tail
        self._held = held[len(held) - num_kept :] + delta
        return held[: len(held) - num_kept], False

    def flush(self) -> str:
        """At finish without a hit: return the held-back tail (it turned out not to be a stop string)."""
        held, self._held = self._held, ""
        self._state = 0
        return held
