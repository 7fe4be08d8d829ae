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
    a whole character). Tokenization-space clean-up is off because it rewrites text across window boundaries.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._token_ids = list(prompt_token_ids[-NUM_INITIAL_CONTEXT_TOKENS:])  # context tail + output tokens
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
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR)):
            return ""  # an unfinished character, or a token with no text yet (a skipped special token)
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        self.text += delta
        return delta


class StopStringMatcher:
    """Cuts streamed text at the first stop string, never emitting part of one.

    "First" is the occurrence that completes earliest in the text (the longest one on a tie), which is what a
    stream sees whatever way the text is split into deltas. `feed` holds back the longest tail of the text that
    could still grow into a stop string; on a hit it returns the text up to the stop string (through it when
    include_stop_str_in_output) and drops the rest. `flush` releases the held-back tail at finish.
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
        """(start, end) of the occurrence ending first past text[:num_unstoppable]; the held tail holds no whole
        stop string fed where one could stop, so any is new."""
        best: tuple[int, int] | None = None
        for s in self.stop_strings:
            start = text.find(s, max(num_unstoppable - len(s) + 1, 0))
            if start < 0:
                continue
            end = start + len(s)
            if best is None or end < best[1] or (end == best[1] and start < best[0]):
                best = (start, end)
        return best

    def _num_tail_held(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        num_held = 0
        for s in self.stop_strings:
            for length in range(min(len(s) - 1, len(text)), num_held, -1):
                if text.endswith(s[:length]):
                    num_held = length
                    break
        return num_held
