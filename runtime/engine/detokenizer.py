"""Incremental detokenisation (multi-byte safe) and stop-string matching for streamed output text."""

from __future__ import annotations

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


class StopStringMatcher:
    """Cuts streamed text at the first stop string (vLLM's choice of it), never emitting part of that one.

    "First" is vLLM's: each `feed` is one token's text, and the text is cut at the first stop string, in the
    order given, that has an occurrence ending in that text (its leftmost such occurrence). Stop strings that
    complete in the text of different tokens are hit in the order the tokens come; where several complete in
    the text of one token, the list order decides, not which completes first. `feed` holds back the longest tail
    of the text that could still grow into a stop string; on a hit it returns the text up to the stop string
    (through it when include_stop_str_in_output) and drops the rest. `flush` releases the held-back tail at
    finish.
    """

    def __init__(self, stop_strings: tuple[str, ...], include_stop_str_in_output: bool) -> None:
        assert all(stop_strings), "stop strings must be non-empty"
        self.stop_strings = tuple(stop_strings)
        self.include_stop_str_in_output = include_stop_str_in_output
        self._held = ""  # text not yet emitted: a tail that is a proper prefix of some stop string
        self._num_held_unstoppable = 0  # leading characters of _held fed with can_stop=False: no hit may end there
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that was hit

    def feed(self, delta: str, can_stop: bool = True) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, whether a stop string was hit). can_stop False: the text of
        an output token within min_tokens, where no stop string may end (vLLM's rule); one may still start in it."""
        assert not self.stopped, "feed after a stop string was hit"
        if not self.stop_strings:
            return delta, False
        text = self._held + delta
        num_unstoppable = self._num_held_unstoppable if can_stop else len(text)  # text[:num_unstoppable]
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
        """At finish without a hit: return the held-back tail (it turned out not to be a stop string)."""
        held, self._held = self._held, ""
        self._num_held_unstoppable = 0
        return held

    def _first_hit(self, text: str, num_unstoppable: int = 0) -> tuple[int, int] | None:
        """(start, end) of the leftmost occurrence, ending past text[:num_unstoppable], of the first stop string
        in list order that has one (vLLM's check_stop_strings); the held tail holds no whole stop string fed where
        one could stop, so any occurrence found ends in the text just fed."""
        for s in self.stop_strings:
            start = text.find(s, max(num_unstoppable - len(s) + 1, 0))
            if start >= 0:
                return start, start + len(s)
        return None

    def _num_tail_held(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        num_held = 0
        for s in self.stop_strings:
            for length in range(min(len(s) - 1, len(text)), num_held, -1):
                if text.endswith(s[:length]):
                    num_held = length
                    break
        return num_held
