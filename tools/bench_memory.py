"""Resident memory of an engine on a build: what the process holds at load and after one long prompt and a batch of
short ones, split into file-backed pages (the mapped weights) and anonymous memory (panels, oneDNN's packed copies,
the KV cache blocks written, PyTorch's own), with the long prompt's time.

    python tools/bench_memory.py BUILD [BUILD ...] [--pythonpath A [--pythonpath B ...]] [--runs 3]

Memory is per process, so each run is a fresh one (`LLM(build)`, cpu backend), the builds taking turns in each
round. --pythonpath, as tools/bench_startup.py takes it, is a folder holding a `pllm` package (a checkout of another
commit): given once, every build runs under it; given once per build, each build under its own ('' for this
checkout). A build carries its own kernels, so compile each with the checkout it runs under. Prints each run's
figures, then per build the range over its runs. Linux (/proc/self/status). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MB = 1 << 20
FIELDS = ("VmRSS", "RssAnon", "RssFile")  # /proc/self/status, in kB
WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex jolly zebras".split()


@dataclass(frozen=True)
class Resident:
    """One process's resident memory in MB: all of it, its anonymous part and its file-backed part."""

    total: float
    anon: float
    file: float

    @classmethod
    def parse(cls, status: str) -> Resident:
        """From /proc/[pid]/status text."""
        kb = {}
        for line in status.splitlines():
            name, _, value = line.partition(":")
            if name in FIELDS:
                kb[name] = int(value.split()[0])
        return cls(*(kb[name] * 1024 / MB for name in FIELDS))

    @classmethod
    def of_process(cls, pid: int) -> Resident | None:
        """A running process's (another's: a server's), or None where /proc does not say."""
        try:
            return cls.parse(Path(f"/proc/{pid}/status").read_text())
        except (OSError, KeyError):
            return None


@dataclass(frozen=True)
class Run:
    loaded: Resident
    after: Resident
    prompt_tokens: int
    prompt_s: float


def child(build: str, prompt_words: int) -> Run:
    """In the measured process: load, run the prompts, read our own status."""
    from pllm import LLM, SamplingParams

    def resident() -> Resident:
        return Resident.parse(Path("/proc/self/status").read_text())

    llm = LLM(build, backend="cpu")
    loaded = resident()
    words = (WORDS * (prompt_words // len(WORDS) + 1))[:prompt_words]
    t0 = time.perf_counter()
    out = llm.generate([" ".join(words)], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    prompt_s = time.perf_counter() - t0
    llm.generate([f"Question {i}:" for i in range(8)], SamplingParams(max_tokens=16, temperature=0.0),
                 use_tqdm=False)
    return Run(loaded, resident(), len(out[0].prompt_token_ids), prompt_s)


def one_run(build: Path, pythonpath: str | None, prompt_words: int) -> Run:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, __file__, "--child", str(build), "--prompt-words", str(prompt_words)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{build} under {pythonpath or 'this checkout'} failed:\n{done.stderr[-3000:]}")
    d = json.loads(done.stdout.strip().splitlines()[-1])
    return Run(Resident(**d["loaded"]), Resident(**d["after"]), d["prompt_tokens"], d["prompt_s"])


def span(values: list[float], fmt: str = "{:.0f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"


def summary(label: str, runs: list[Run]) -> str:
    after = [r.after for r in runs]
    return (f"{label}: resident {span([a.total for a in after])} MB (anonymous {span([a.anon for a in after])}, "
            f"file {span([a.file for a in after])}); at load {span([r.loaded.total for r in runs])} MB; "
            f"{runs[0].prompt_tokens}-token prompt median {statistics.median(r.prompt_s for r in runs):.2f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("builds", nargs="+", type=Path)
    p.add_argument("--pythonpath", action="append", help="a folder holding a pllm package; repeat to compare")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt-words", type=int, default=480)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        run = child(str(args.builds[0]), args.prompt_words)
        print(json.dumps({"loaded": vars(run.loaded), "after": vars(run.after), "prompt_tokens": run.prompt_tokens,
                          "prompt_s": run.prompt_s}))
        return 0
    paths = args.pythonpath or [""]
    if len(paths) not in (1, len(args.builds)):
        p.error(f"give --pythonpath once, or once per build ({len(args.builds)}), not {len(paths)} times")
    pairs = [(b, pp or None) for b, pp in zip(args.builds, paths * len(args.builds) if len(paths) == 1 else paths)]
    runs: dict[tuple, list[Run]] = {pair: [] for pair in pairs}
    for r in range(args.runs):
        for build, pp in pairs:
            run = one_run(build, pp, args.prompt_words)
            runs[(build, pp)].append(run)
            print(f"run {r + 1} {build} {pp or ''}: resident {run.after.total:.0f} MB (anonymous "
                  f"{run.after.anon:.0f}, file {run.after.file:.0f}), prompt {run.prompt_s:.2f} s", flush=True)
    print()
    for (build, pp), rs in runs.items():
        print(summary(f"{build}{' under ' + pp if pp else ''}", rs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
