"""The grammar process (runtime/engine/grammar_process.py): each new spec tried in a child process bounded in time,
and what goes wrong there: a compile past its time, a child killed from outside, shut down mid-compile, noise on
the child's stdout, a folder whose files would shadow the child's imports."""

from __future__ import annotations

import gc
import os
import signal
import time

import pytest

from pllm import LLM, StructuredOutputsParams
from pllm.runtime.engine.grammar_process import GrammarProcessFailed
from pllm.runtime.engine.structured_output import GrammarCache, GrammarError, SequenceGrammar

SLOW_GRAMMAR = "root ::= " + " ".join(['[^"]'] * 10_000)  # ~1.5 s over the tiny model's 400 tokens


@pytest.fixture(scope="module")
def llm(tiny_build):
    return LLM(str(tiny_build("llama")), backend="cpu", kv_cache_memory=1 << 24)


def cache_of(llm, timeout_s: float = 30.0) -> GrammarCache:
    return GrammarCache(llm.tokenizer, llm.engine.spec.vocab_size, llm.engine.eos_token_ids, timeout_s=timeout_s)


def wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_compile_past_its_time_is_killed_and_refused_and_the_next_one_runs(llm):
    """xgrammar cannot be interrupted, and this grammar (10,000 wide character classes, 50 KB) takes ~1.5 s here over
    the tiny model's 400 tokens (3,000 of them over SmolLM2's 49,152: ~15 s): past the cache's time the process
    trying it is killed, the spec refused naming the field and the bound (the same spec again at once, from the
    cache), and the next spec compiles after a trial in a fresh process."""
    cache = cache_of(llm, timeout_s=0.3)
    try:
        assert cache.compile(StructuredOutputsParams(regex="[ab]+")).result() is not None  # the process is up
        first = cache._process._proc
        slow = StructuredOutputsParams(grammar=SLOW_GRAMMAR)
        began = time.monotonic()
        with pytest.raises(GrammarError, match=r"could not be compiled within 0\.3 s") as info:
            cache.compile(slow).result()
        assert time.monotonic() - began < 8 and info.value.param == "structured_outputs.grammar"
        assert first.poll() is not None  # killed, not left computing
        with pytest.raises(GrammarError, match=r"within 0\.3 s"):
            cache.compile(slow).result(timeout=0.1)
        assert cache.compile(StructuredOutputsParams(regex="[cd]+")).result() is not None
        assert cache._process.num_started == 2
    finally:
        cache.shutdown()
    assert cache._process._proc is None


def test_a_child_killed_mid_compile_is_not_the_specs_fault(llm):
    """Killed from outside while it compiles: the spec is tried once more in a fresh child and compiles; nothing is
    cached against it."""
    cache = cache_of(llm)
    try:
        assert cache.compile(StructuredOutputsParams(regex="[ab]+")).result() is not None
        process = cache._process
        future = cache.compile(StructuredOutputsParams(grammar=SLOW_GRAMMAR))
        first = process._proc
        time.sleep(0.3)  # inside the compile
        os.kill(first.pid, signal.SIGKILL)
        assert future.result(timeout=120) is not None
        assert process.num_started == 2
    finally:
        cache.shutdown()


def test_shutdown_mid_compile_fails_it_and_leaves_no_child(llm):
    cache = cache_of(llm)
    future = cache.compile(StructuredOutputsParams(grammar=SLOW_GRAMMAR))
    pending = cache.compile(StructuredOutputsParams(regex="[ab]+"))  # queued behind it
    wait_for(lambda: cache._process._ready)  # the child is compiling it
    child = cache._process._proc
    cache.shutdown()
    with pytest.raises(GrammarProcessFailed, match="shut down"):
        future.result(timeout=60)
    assert pending.cancelled()  # a request waiting on it is refused at the next step, not the step's crash
    assert isinstance(SequenceGrammar(pending, llm.engine.spec.vocab_size).error(), GrammarProcessFailed)
    assert child.poll() is not None
    wait_for(lambda: cache._process._proc is None)
    with pytest.raises(GrammarProcessFailed, match="shut down"):  # nothing starts again
        cache._process.start()


def test_noise_on_the_childs_stdout_and_a_shadowing_folder_change_nothing(llm, tmp_path, monkeypatch):
    """A sitecustomize that prints at the child's start (stdout is not its wire), and a current folder holding an
    `xgrammar.py` that would shadow the real one (the child imports from the engine's own sys.path)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("print('noise from sitecustomize')\n")
    (tmp_path / "xgrammar.py").write_text("raise ImportError('the wrong xgrammar')\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.chdir(tmp_path)
    cache = cache_of(llm)
    try:
        assert cache.compile(StructuredOutputsParams(regex="[ab]{2}")).result(timeout=120) is not None
        with pytest.raises(GrammarError, match="structured_outputs.grammar could not be compiled"):
            cache.compile(StructuredOutputsParams(grammar="root ::= nope")).result(timeout=60)
    finally:
        cache.shutdown()


def test_a_dropped_cache_takes_its_thread_and_child_with_it(llm):
    cache = cache_of(llm)
    assert cache.compile(StructuredOutputsParams(regex="[ab]+")).result() is not None
    child, thread = cache._process._proc, cache._worker._thread
    del cache
    gc.collect()
    wait_for(lambda: child.poll() is not None and not thread.is_alive())
