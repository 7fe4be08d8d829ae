"""Structured output: grammars compiled off the engine loop into a bounded cache, and one matcher per sequence."""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from pllm.runtime.engine.grammar_compile import GrammarRefused, compile_value
from pllm.runtime.engine.grammar_process import (
    GrammarChildDied,
    GrammarProcess,
    GrammarProcessFailed,
    GrammarTimedOut,
)
from pllm.runtime.engine.param_checks import InvalidParam
from pllm.runtime.engine.structured_outputs_params import StructuredOutputsParams
from pllm.runtime.worker.text_loader import transformers_tokenizer

logger = logging.getLogger("pllm")

MAX_CACHED_GRAMMARS = 256  # distinct specs kept compiled; the least recently used goes first
# A compile running longer is killed with its process and the spec refused (a 400): xgrammar cannot be interrupted,
# and the slowest specs found run for minutes. Real schemas compile in milliseconds; within the size bounds, 1,024
# optional properties take a few seconds, and a 64 KiB grammar of wide character classes ~50 s (refused now).
GRAMMAR_COMPILE_TIMEOUT_S = 30.0


class GrammarError(InvalidParam):
    """A schema, regex or grammar the compiler refused; param names the field, as for any invalid parameter."""


class _Worker:
    """Calls run one at a time, in order, on one daemon thread started by the first: ThreadPoolExecutor's threads
    are joined at the interpreter's exit, which would hold the exit up for a compile in flight."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._queue.put((future, fn, args))
        return future

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            self._call(*item)
            del item  # holds the callable (a bound method keeps its cache alive while the thread waits)

    @staticmethod
    def _call(future: Future, fn: Callable[..., Any], args: tuple) -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # the caller's to see, as an executor's future carries it
                future.set_exception(exc)

    def shutdown(self) -> None:
        """Calls not started are cancelled; the thread ends after the one running, if any."""
        with self._lock:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
            self._queue.put(None)


class GrammarCache:
    """Compiles each distinct spec once (keyed by its canonical form) on a worker thread, after a trial in the
    grammar process (grammar_process.py: bounded by timeout_s, GRAMMAR_COMPILE_TIMEOUT_S unless given), keeping the
    most recently used MAX_CACHED_GRAMMARS (a refusal too: the same spec again fails at once; a failure of the
    grammar process itself is not kept). compile() returns at once with a future; the engine loop never waits on it:
    a request whose grammar is not ready stays in the waiting queue while the rest of the batch steps. Thread-safe:
    the HTTP layer compiles before queueing (so a bad schema is a 400 at once), the engine thread when a request
    arrives."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...],
                 max_entries: int = MAX_CACHED_GRAMMARS, timeout_s: float | None = None) -> None:
        self.vocab_size = vocab_size  # the logits' width, which may exceed the tokenizer's vocabulary
        self.max_entries = max_entries
        self.timeout_s = GRAMMAR_COMPILE_TIMEOUT_S if timeout_s is None else timeout_s
        self._tokenizer = tokenizer
        self._stop_token_ids = list(stop_token_ids)
        self._process = GrammarProcess(self.timeout_s)  # its child starts with the first compile
        self._compiler: Any = None  # this process's, made by the first compile (the vocabulary scan takes time)
        self._entries: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()
        self._worker = _Worker("pllm-grammar")
        # shutdown, also for a cache dropped unshut or at the interpreter's exit: the thread and the child go too
        self._release = weakref.finalize(self, GrammarCache._stop, self._worker, self._process)
        self.num_compiled = 0  # compilations started (cache misses), for tests and metrics

    def compile(self, spec: StructuredOutputsParams) -> Future:
        """A future of the compiled grammar; its exception is a GrammarError naming the field (or, for a failure of
        the grammar process itself, a GrammarProcessFailed)."""
        key = spec.key()
        with self._lock:
            future = self._entries.get(key)
            if future is not None:
                self._entries.move_to_end(key)
                return future
            future = self._worker.submit(self._compile, spec)
            self.num_compiled += 1
            self._entries[key] = future
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)  # requests holding the future keep their grammar
        return future

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        kind, field = spec.kind, f"structured_outputs.{spec.kind}"
        value = getattr(spec, kind)
        try:
            self._prepare()
            self._try(kind, value)  # bounded in time: a child process, killed past timeout_s
            return compile_value(self._compiler, kind, value)  # then here, where the matchers live
        except GrammarRefused as exc:
            raise GrammarError(field, f"{field} could not be compiled: {exc}") from None
        except GrammarTimedOut:
            raise GrammarError(field, f"{field} could not be compiled within {self.timeout_s:g} s, the time a grammar "
                               "may take (GRAMMAR_COMPILE_TIMEOUT_S); simplify it (nested counted repeats and many "
                               "optional properties are what compile slowly)") from None
        except GrammarChildDied as exc:
            raise GrammarError(field, f"{field} could not be compiled: the grammar process died compiling it, "
                               f"twice ({exc})") from None
        except GrammarProcessFailed:
            with self._lock:
                self._entries.pop(spec.key(), None)  # not the spec's fault: the next request tries again
            raise

    def _try(self, kind: str, value: Any) -> None:
        """The trial in the grammar process; a child that dies on it (killed from outside, or the spec's own crash
        or memory) gets one more, in a fresh child, before the spec is blamed."""
        try:
            self._process.check(kind, value)
        except GrammarChildDied:
            logger.warning("structured output: the grammar process died compiling a %s; trying once more", kind)
            self._process.check(kind, value)

    def _prepare(self) -> None:
        if self._compiler is not None:
            return
        self._process.start()  # its imports meanwhile
        import xgrammar as xgr  # lazily: pllm imports, and serves free text, without it

        info = xgr.TokenizerInfo.from_huggingface(
            transformers_tokenizer(self._tokenizer), vocab_size=self.vocab_size, stop_token_ids=self._stop_token_ids
        )
        # our cache replaces xgrammar's (keyed by canonical spec, bounded in entries)
        self._process.tokenizer_info = info
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def shutdown(self) -> None:
        """Pending compiles cancelled, the one running failed, the grammar process killed; no other starts."""
        self._release()

    @staticmethod
    def _stop(worker: _Worker, process: GrammarProcess) -> None:
        worker.shutdown()
        process.shutdown()


@dataclass(frozen=True)
class GrammarState:
    """What the sampler reads of a matcher at one position: the tokens allowed next, and whether EOS is."""

    bitmask: torch.Tensor | None  # [ceil(vocab_size / 32)] int32, bit t set when token t is allowed; None: all are
    can_end: bool  # the output up to here is a complete match


class SequenceGrammar:
    """One sequence's place in its grammar: a matcher made once the compiled grammar is ready, advanced with every
    token the sequence outputs. Preemption by recompute keeps the output tokens, so the matcher, which has accepted
    exactly those, stays valid; were it ever rebuilt, start() replays them. Speculative decoding walks it over a
    step's guesses and rolls it back (valid_prefix, states_along): between steps it holds the output tokens only."""

    def __init__(self, future: Future, vocab_size: int) -> None:
        self._future = future
        self._vocab_size = vocab_size
        self._matcher: Any = None
        self.num_accepted = 0
        self.rejected = False  # a token the grammar refused reached it (a bug upstream): the sequence stops

    @property
    def ready(self) -> bool:
        """The compiled grammar is available (or failed): the scheduler may admit the sequence."""
        return self._future.done()

    def error(self) -> Exception | None:
        """Why the grammar cannot be had (GrammarError: the spec's fault; GrammarProcessFailed: not), else None."""
        if not self._future.done():
            return None
        if self._future.cancelled():  # the cache was shut down before it compiled
            return GrammarProcessFailed("the grammar cache was shut down")
        return self._future.exception()  # type: ignore[return-value]

    def start(self, output_token_ids: list[int]) -> None:
        import xgrammar as xgr

        # rollback has no bound (xgrammar 0.2's max_rollback_tokens is deprecated, always unlimited)
        self._matcher = xgr.GrammarMatcher(self._future.result())
        self.num_accepted = 0
        for token_id in output_token_ids:
            self.accept(token_id)

    @property
    def matcher(self) -> Any:
        if self._matcher is None:
            self.start([])
        return self._matcher

    def accept(self, token_id: int) -> None:
        if not self.matcher.accept_token(token_id):
            logger.error("structured output: token %d was outside the grammar; stopping the sequence", token_id)
            self.rejected = True
        self.num_accepted += 1

    @property
    def finished(self) -> bool:
        """The grammar accepted its stop token (EOS), or was broken: either way the sequence ends here."""
        return self.rejected or (self._matcher is not None and self._matcher.is_terminated())

    @property
    def can_end(self) -> bool:
        """The output so far is a complete match: EOS is allowed now (and is all a finished JSON value allows)."""
        return self.matcher.is_completed()

    def next_token_bitmask(self) -> torch.Tensor | None:
        """[ceil(vocab_size / 32)] int32, bit t set when token t is allowed next; None when every token is."""
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(1, self._vocab_size)  # [1, ceil(vocab_size / 32)]
        if not self.matcher.fill_next_token_bitmask(bitmask, 0):
            return None
        return bitmask[0]

    def state(self) -> GrammarState:
        """The matcher's state now, as the sampler reads it."""
        return GrammarState(self.next_token_bitmask(), self.can_end)

    def valid_prefix(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of token_ids (a step's guesses) the grammar takes in order without ending: a
        guess it refuses, or one that would terminate it (its stop token: nothing may be guessed past it), cuts
        the guesses there. The matcher is left as it was."""
        matcher = self.matcher
        if self.finished:
            return 0
        taken = 0
        for token_id in token_ids:
            if not matcher.accept_token(token_id):
                break
            taken += 1
            if matcher.is_terminated():
                taken -= 1
                self._rollback(taken + 1)
                return taken
        self._rollback(taken)
        return taken

    def states_along(self, token_ids: Sequence[int]) -> tuple[GrammarState, ...]:
        """[len(token_ids) + 1] the state before each guess and after the last: state j is the matcher's after
        accepting token_ids[:j] (a verify step's row j). Every guess must be one valid_prefix kept; the matcher
        is left as it was."""
        matcher = self.matcher
        states = [self.state()]
        for token_id in token_ids:
            if not matcher.accept_token(token_id):
                self._rollback(len(states) - 1)
                raise ValueError(f"guess {token_id} is outside the grammar: valid_prefix should have cut it")
            states.append(self.state())
        self._rollback(len(token_ids))
        return tuple(states)

    def _rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self._matcher.rollback(num_tokens)
