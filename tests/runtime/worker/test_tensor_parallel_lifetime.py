"""The life of a tensor-parallel engine's worker processes: they ignore the stop signals a whole process group gets
(rank 0 drains, then stops them) yet never outlive rank 0; the ranks split the process's thread budget; one engine
per process; a worker dying before it joins fails the start at once; a normal exit without close() is quiet."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pllm.runtime.engine.llm import LLM
from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.worker.parallel.lifetime import EngineAlreadyRunning, rank_threads

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = ["Hello, world! The quick", "Paged attention keeps"]


def _tokens(llm: LLM, params: SamplingParams = GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def _run(script: str, tmp_path: Path, timeout: float, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "script.py"
    path.write_text(script)
    return subprocess.run([sys.executable, str(path), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout)


def _ignores_stop_signals(pid: int) -> bool:
    """Whether the process ignores SIGINT and SIGTERM (its SigIgn mask): the worker has set itself up."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return all(mask >> (sig - 1) & 1 for sig in (signal.SIGINT, signal.SIGTERM))
    return False


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited; whoever adopted it reaps it


def test_workers_ignore_stop_signals_sent_to_the_whole_group(tiny_tp_build):
    """Ctrl-C and systemd's stop reach every process of the group: the worker carries on (rank 0 drains its
    requests), and stops when rank 0 says so."""
    llm = LLM(str(tiny_tp_build("llama", 2)), backend="cpu", tensor_parallel_size=2)
    try:
        expected = _tokens(llm)
        worker = llm.engine.runner.workers[0]
        for sig in (signal.SIGTERM, signal.SIGINT):
            threading.Timer(0.2, os.kill, (worker.pid, sig)).start()  # mid-generation
        long = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
        llm.generate(PROMPTS * 2, long, use_tqdm=False)
        assert worker.is_alive()
        assert _tokens(llm) == expected
    finally:
        llm.close()
    assert worker.exitcode == 0  # stopped by rank 0's STOP, not by a signal


WORKER_WITHOUT_RANK0 = """
import multiprocessing, os, sys, time
from pllm.runtime.engine.config import EngineConfig
from pllm.runtime.worker.parallel.group import local_address
from pllm.runtime.worker.parallel.worker import worker_main

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    headers, _ = ctx.Pipe(duplex=False)
    _, errors = ctx.Pipe(duplex=False)
    # no rank 0 listens at this address: the worker waits to join, neither idle on its pipe nor in a collective
    p = ctx.Process(target=worker_main, args=(sys.argv[1], EngineConfig(backend="cpu"), 64,
                                               local_address(2, "cpu"), 1, headers, errors))
    p.start()
    print(p.pid, flush=True)
    sys.stdin.readline()  # until the test has signalled the worker
    os._exit(0)
"""


def test_a_worker_ignoring_signals_still_exits_with_rank0(tiny_tp_build, tmp_path):
    """Ignoring SIGTERM must not orphan a worker: it exits once rank 0's process is gone, even while it waits to
    join the group (where neither its pipe's EOF nor a collective's error would tell it)."""
    path = tmp_path / "script.py"
    path.write_text(WORKER_WITHOUT_RANK0)
    rank0 = subprocess.Popen([sys.executable, str(path), str(tiny_tp_build("llama", 2))], cwd=tmp_path,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid = None
    try:
        pid = int(rank0.stdout.readline())
        deadline = time.monotonic() + 30
        while not _ignores_stop_signals(pid) and time.monotonic() < deadline:  # up, and waiting to join
            time.sleep(0.05)
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        assert _alive(pid), "the worker died of SIGTERM"
        rank0.stdin.write("\n")
        rank0.stdin.flush()
        assert rank0.wait(timeout=10) == 0
        deadline = time.monotonic() + 10  # not the store's 60 s connect timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), "the worker outlived rank 0"
    finally:
        rank0.kill()
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_ranks_split_the_threads_the_process_was_given(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # a large node; this process was given less of it
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert rank_threads(2) == 3  # the affinity mask
    monkeypatch.setenv("OMP_NUM_THREADS", "8,2")  # OpenMP's nested list: the outer level
    assert rank_threads(2) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert rank_threads(4) == 1  # never 0


def test_an_engine_uses_omp_num_threads_not_the_core_count(tiny_tp_build, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # as Ray sets it from an actor's CPUs
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with LLM(str(tiny_tp_build("llama", 2)), backend="cpu", tensor_parallel_size=2):
            assert torch.get_num_threads() == 1  # rank 0's half of 2, not 64 // 2
        assert torch.get_num_threads() == 3  # close() gives the process its count back, for the next engine
        with LLM(str(tiny_tp_build("llama", 1)), backend="cpu", num_threads=2):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 3  # a single process's engine alike
    finally:
        torch.set_num_threads(before)


def test_a_second_engine_in_the_process_is_refused_and_the_first_goes_on(tiny_tp_build):
    build = str(tiny_tp_build("llama", 2))
    with LLM(build, backend="cpu", tensor_parallel_size=2) as first:
        expected = _tokens(first)
        start = time.monotonic()
        with pytest.raises(EngineAlreadyRunning, match="already running in this process.*close\\(\\) the other LLM"):
            LLM(build, backend="cpu", tensor_parallel_size=2)
        assert time.monotonic() - start < 5  # refused at once, before any worker starts
        assert _tokens(first) == expected
    assert not dist.is_initialized()  # the first's close() left the group; another may start now


NO_MAIN_GUARD = """
from pllm.runtime.engine.llm import LLM
import sys
LLM(sys.argv[1], backend="cpu", tensor_parallel_size=2)
"""


def test_a_worker_that_dies_before_joining_fails_the_start_at_once(tiny_tp_build, tmp_path):
    """A script without the __main__ guard: the spawned worker re-imports it and exits before joining. The start
    fails within seconds (not the 60 s rendezvous timeout), saying why."""
    start = time.monotonic()
    done = _run(NO_MAIN_GUARD, tmp_path, 50, str(tiny_tp_build("llama", 2)))
    assert done.returncode != 0
    assert time.monotonic() - start < 40
    assert "WorkerDied: tensor-parallel worker rank 1" in done.stderr
    assert "exited with code 1 before it joined the process group" in done.stderr
    assert 'needs the `if __name__ == "__main__":` guard' in done.stderr


EXIT_WITHOUT_CLOSE = """
import sys
from pllm.runtime.engine.llm import LLM
from pllm.runtime.engine.sampling_params import SamplingParams

if __name__ == "__main__":
    llm = LLM(sys.argv[1], backend="cpu", tensor_parallel_size=2)
    llm.generate(["Hello"], SamplingParams(max_tokens=3), use_tqdm=False)
    print("done", flush=True)
"""


def test_an_exit_without_close_stops_the_workers_quietly(tiny_tp_build, tmp_path):
    done = _run(EXIT_WITHOUT_CLOSE, tmp_path, 60, str(tiny_tp_build("llama", 2)))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "done\n"
    assert "ERROR" not in done.stderr and "exited with code" not in done.stderr, done.stderr
