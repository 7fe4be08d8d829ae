"""xgrammar's compiler run in a process of its own first, so that a compile can be bounded in time.

A compile runs in C++ and cannot be interrupted, and some specs take minutes (an 18 KB grammar of 3,000 wide
character classes, `[^"] [^"] ...`: 15 s; longer ones grow past that) on a core the server's steps need, while
every other structured request waits behind it. So each spec is first compiled in a child process that the engine's
grammar thread waits on for at most `timeout_s`: past that the child is killed and the spec refused, and the next
spec starts a fresh child; a spec the child compiles in time (or refuses, in xgrammar's words) is then compiled
again in the engine's process, where its matchers live. A compiled grammar is not sent back: its serialised form
holds every token mask (963 MB and ~40 s to write for a 2,000-property schema that compiles in 0.4 s), so compiling
twice is far cheaper. The worst case for one spec is thus about twice the bound.

The child imports exactly what the engine would: it starts from the engine's own sys.path (not the current folder's
nor PYTHONPATH's view of it), and dies with the thread that started it (Linux's parent-death signal), so a killed
engine leaves no compile running. The wire is a pipe of its own (what the child's libraries print on stdout cannot
reach it), one JSON object a line: the child's {"ready": true} once its compiler is made from the TokenizerInfo the
parent wrote on its stdin first (not part of any compile's time); then per spec, in on stdin {"kind", "value"} (a
StructuredOutputsParams field and its value), out {"compiled": true} or {"refused": xgrammar's message}.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from typing import Any

STARTUP_TIMEOUT_S = 120.0  # a child's imports (xgrammar brings torch: ~2.5 s here) and its compiler, before it answers
SYS_PATH_ENV = "PLLM_GRAMMAR_SYS_PATH"
# The child's first statements: os and sys are loaded before any path is searched, so nothing can stand in for them
BOOT = (f"import os, sys; sys.path[:] = os.environ.pop({SYS_PATH_ENV!r}).split(os.pathsep); "
        "from pllm.runtime.engine.grammar_process import main; main()")
PR_SET_PDEATHSIG = 1  # prctl(2)


class GrammarTimedOut(TimeoutError):
    """A compile took longer than the time allowed: its process was killed."""


class GrammarProcessFailed(RuntimeError):
    """The grammar process failed on this side: it could not start, answered out of turn, or was shut down."""


class GrammarChildDied(GrammarProcessFailed):
    """The child exited while compiling a spec (a crash, out of memory, or killed from outside)."""


class GrammarProcess:
    """One child process trying grammars for one tokenizer, started on first use and again after it is lost. Every
    call but shutdown() comes from one thread (the engine's grammar thread)."""

    def __init__(self, timeout_s: float) -> None:
        self.tokenizer_info: Any = None  # xgrammar.TokenizerInfo, sent to each child: set before the first check
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None
        self._wire: int | None = None  # the read end of the child's answers
        self._ready = False  # the running child has its compiler
        self._pending = b""  # bytes read past the last full line
        self._busy = threading.Lock()  # held by the grammar thread while it talks to the child
        self._shut = False
        self.num_started = 0  # children started (the first, and one after each loss), for tests and logs

    def start(self) -> None:
        """Start a child if none runs: its imports take seconds, which overlap whatever the caller does before its
        first check (making the TokenizerInfo)."""
        with self._busy:
            self._start()

    def check(self, kind: str, value: Any) -> None:
        """Compile one field's value in the child: returns if it compiles within timeout_s; GrammarRefused with
        xgrammar's words; GrammarTimedOut past timeout_s (the child killed); GrammarChildDied if the child exits
        meanwhile; GrammarProcessFailed for a failure on this side."""
        from pllm.runtime.engine.grammar_compile import GrammarRefused

        with self._busy:
            self._start()
            if not self._ready:
                self._send(self.tokenizer_info.serialize_json())
                if self._answer(time.monotonic() + STARTUP_TIMEOUT_S, "starting") != {"ready": True}:
                    self._discard()
                    raise GrammarProcessFailed("the grammar process did not say it was ready")
                self._ready = True
            self._send(json.dumps({"kind": kind, "value": value}))
            answer = self._answer(time.monotonic() + self.timeout_s, "compiling")
            if answer is None:
                self._discard()
                raise GrammarTimedOut(f"not compiled within {self.timeout_s:g} s")
            if answer == {"compiled": True}:
                return
            if set(answer) == {"refused"} and isinstance(answer["refused"], str):
                raise GrammarRefused(answer["refused"])
            self._discard()
            raise GrammarProcessFailed(f"the grammar process answered out of turn: {str(answer)[:200]}")

    def shutdown(self) -> None:
        """From any thread: no child is started again; the running one is killed (a compile in flight fails)."""
        self._shut = True
        proc = self._proc
        if proc is not None:
            proc.kill()
        if self._busy.acquire(blocking=False):  # nobody talking to it: release its pipes here
            try:
                self._discard()
            finally:
                self._busy.release()

    # -- the child (under _busy) -----------------------------------------------------------------
    def _start(self) -> None:
        if self._shut:
            raise GrammarProcessFailed("the grammar process was shut down")
        if self._proc is not None and self._proc.poll() is None:
            return
        self._discard()
        read, write = os.pipe()
        env = {**os.environ, SYS_PATH_ENV: os.pathsep.join(sys.path)}
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", BOOT, str(write), str(os.getpid())],
                                          stdin=subprocess.PIPE, pass_fds=(write,), env=env)
        except OSError as exc:
            os.close(read)
            raise GrammarProcessFailed(f"the grammar process could not start: {exc}") from None
        finally:
            os.close(write)
        self._wire = read
        self.num_started += 1
        if self._shut:  # shut down while it started: shutdown() may not have seen it
            self._discard()
            raise GrammarProcessFailed("the grammar process was shut down")

    def _send(self, line: str) -> None:
        try:
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()
        except (OSError, ValueError):  # its stdin closed: it has exited
            self._lost("taking a request")

    def _answer(self, deadline: float, doing: str) -> dict | None:
        """The child's next answer, or None once the deadline passes."""
        with selectors.DefaultSelector() as sel:
            sel.register(self._wire, selectors.EVENT_READ)
            while b"\n" not in self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                chunk = os.read(self._wire, 1 << 16)
                if not chunk:
                    self._lost(doing)
                self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        try:
            answer = json.loads(line)
        except ValueError:
            answer = line.decode(errors="replace")
        if not isinstance(answer, dict):
            self._discard()
            raise GrammarProcessFailed(f"the grammar process answered out of turn: {str(answer)[:200]}")
        return answer

    def _lost(self, doing: str) -> None:
        code = self._proc.wait()
        self._discard()
        if self._shut:
            raise GrammarProcessFailed("the grammar process was shut down")
        if doing == "compiling":
            raise GrammarChildDied(f"the grammar process died while compiling (exit status {code})")
        raise GrammarProcessFailed(f"the grammar process exited (status {code}) while {doing}")

    def _discard(self) -> None:
        """Kill the child, if any, and close its pipes; the next check starts another."""
        proc, wire = self._proc, self._wire
        self._proc, self._wire, self._pending, self._ready = None, None, b"", False
        if proc is not None:
            proc.kill()
            proc.wait()
            proc.stdin.close()
        if wire is not None:
            os.close(wire)


def main() -> None:
    """The child (BOOT): argv the answers' pipe and the engine's pid. TokenizerInfo from the first line of stdin,
    then one compile per line until stdin closes."""
    wire_fd, parent = int(sys.argv[1]), int(sys.argv[2])
    if sys.platform.startswith("linux"):  # die with the engine's thread that started this one
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # it went before the request took effect
            os._exit(0)
    wire = os.fdopen(wire_fd, "w")

    def answer(message: dict) -> None:
        try:
            wire.write(json.dumps(message) + "\n")
            wire.flush()
        except BrokenPipeError:  # the engine has gone: nobody to answer
            os._exit(0)

    import xgrammar as xgr

    from pllm.runtime.engine.grammar_compile import GrammarRefused, compile_value

    info = xgr.TokenizerInfo.deserialize_json(sys.stdin.readline())
    # the parent's cache is keyed by canonical spec and bounded: xgrammar's own would only grow
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    answer({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            compile_value(compiler, request["kind"], request["value"])
            answer({"compiled": True})
        except GrammarRefused as exc:
            answer({"refused": str(exc)})
