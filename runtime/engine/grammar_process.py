"""xgrammar's compiler run in a process of its own first, so that a compile can be bounded in time.

A compile runs in C++ and cannot be interrupted, and some specs take minutes (an 18 KB grammar of 3,000 wide
character classes, `[^"] [^"] ...`: 15 s; longer ones grow past that) on a core the server's steps need, while
every other structured request waits behind it. So each spec is first compiled in a child process
(`python -m pllm.runtime.engine.grammar_process`) that the engine's grammar thread waits on for at most
`timeout_s`: past that the child is killed and the spec refused, and the next spec starts a fresh child; a spec the
child compiles in time (or refuses, in xgrammar's words) is then compiled again in the engine's process, where its
matchers live. A compiled grammar is not sent back: its serialised form holds every token mask (963 MB and ~40 s
to write for a 2,000-property schema that compiles in 0.4 s), so compiling twice is far cheaper.

The wire, one JSON object a line each way: first the parent's xgrammar TokenizerInfo (serialize_json), answered by
{"ready": true} once the child's compiler is made (not part of any compile's time); then per spec {"kind", "value"}
(a StructuredOutputsParams field and its value), answered by {"compiled": true} or {"refused": xgrammar's message}.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pllm

STARTUP_TIMEOUT_S = 120.0  # a child's imports (xgrammar brings torch: ~2.5 s here) and its compiler, before it answers


class GrammarTimedOut(TimeoutError):
    """A compile took longer than the time allowed: its process was killed."""


class GrammarProcess:
    """One child process trying grammars for one tokenizer, started on first use and again after a kill. Not
    thread-safe: one caller (the engine's grammar thread)."""

    def __init__(self, timeout_s: float) -> None:
        self.tokenizer_info: Any = None  # xgrammar.TokenizerInfo, sent to each child: set before the first check
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None
        self._ready = False  # the running child has its compiler
        self._pending = b""  # bytes read past the last full line
        self.num_started = 0  # children started (the first, and one after each kill), for tests and logs

    def start(self) -> None:
        """Start a child if none runs: its imports take seconds, which overlap whatever the caller does before its
        first check (making the TokenizerInfo)."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self.close()
        env = dict(os.environ)  # the child imports this pllm, wherever it was imported from
        root = str(Path(pllm.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen([sys.executable, "-m", "pllm.runtime.engine.grammar_process"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.num_started += 1

    def check(self, kind: str, value: Any) -> None:
        """Compile one field's value in the child: returns if it compiles within timeout_s; GrammarRefused with
        xgrammar's words, GrammarTimedOut past timeout_s (the child killed), RuntimeError if the child died."""
        from pllm.runtime.engine.grammar_compile import GrammarRefused

        proc = self._child()
        proc.stdin.write(json.dumps({"kind": kind, "value": value}).encode() + b"\n")
        proc.stdin.flush()
        reply = self._read_line(time.monotonic() + self.timeout_s)
        if reply is None:
            self.close()
            raise GrammarTimedOut(f"not compiled within {self.timeout_s:g} s")
        answer = json.loads(reply)
        if "refused" in answer:
            raise GrammarRefused(answer["refused"])

    def _child(self) -> subprocess.Popen:
        self.start()
        if not self._ready:  # its tokenizer, then its word that the compiler is made: not part of a compile's time
            self._proc.stdin.write(self.tokenizer_info.serialize_json().encode() + b"\n")
            self._proc.stdin.flush()
            if self._read_line(time.monotonic() + STARTUP_TIMEOUT_S) is None:
                self.close()
                raise RuntimeError(f"the grammar process did not start within {STARTUP_TIMEOUT_S:g} s")
            self._ready = True
        return self._proc

    def _read_line(self, deadline: float) -> bytes | None:
        """The child's next line, or None once the deadline passes; RuntimeError if it exits first."""
        out = self._proc.stdout
        with selectors.DefaultSelector() as sel:
            sel.register(out, selectors.EVENT_READ)
            while b"\n" not in self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                chunk = os.read(out.fileno(), 1 << 20)
                if not chunk:
                    code = self._proc.wait()
                    self.close()
                    raise RuntimeError(f"the grammar process exited (status {code}) while compiling")
                self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line

    def close(self) -> None:
        """Kill the child, if any (a compile in flight is lost); the next compile starts another."""
        proc, self._proc, self._pending, self._ready = self._proc, None, b"", False
        if proc is not None:
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                stream.close()


def main() -> None:
    """The child: TokenizerInfo from the first line, then one compile per line until stdin closes. The answers go
    out on a copy of stdout; stdout itself becomes stderr, so nothing a library prints reaches the wire."""
    wire = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr

    import xgrammar as xgr

    from pllm.runtime.engine.grammar_compile import GrammarRefused, compile_value

    def answer(message: dict) -> None:
        wire.write(json.dumps(message) + "\n")
        wire.flush()

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


if __name__ == "__main__":
    main()
