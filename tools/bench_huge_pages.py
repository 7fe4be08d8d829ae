"""Weights in huge pages against weights as safetensors maps them: the evidence behind runtime/worker/huge_pages.py;
with `--panels`, packed weights' panels in huge pages against ordinary ones: the evidence behind
runtime/backends/cpu/huge_page_memory.py.

    python tools/bench_huge_pages.py BUILD [BUILD ...] [--batches 1,16] [--rounds 40] [--steps 4] [--panels]

Each build loads twice on the cpu backend, side by side: with `huge_pages=True` (the weights read into memory that
asks for 2 MiB pages) and without (the file mapped by `safetensors.torch.load_file`: 4 KiB page-cache pages). The
same decode-only batch (prompts of 64 random tokens) runs on both, the two taking turns every --steps engine steps
for --rounds rounds, so drift on a shared machine hits both alike. Prints per build and batch size the median ms
per step of each, and the median over rounds of (mapped / huge pages) time: above 1, huge pages are faster. Also
how much memory the kernel backed with huge pages for the huge-pages engine (the process's AnonHugePages).
With --panels (builds made with `pllm-compile --quantization`, on a CPU where the step reads panels: AVX512-VNNI),
both engines map the weights as safetensors does, and the second makes its panels in ordinary anonymous memory: the
same mappings asking for ordinary pages (MADV_NOHUGEPAGE) instead of huge ones, the one thing that differs. A
benchmark, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import mmap
import random
import statistics
import time
import unittest.mock
from pathlib import Path

from pllm import LLM, SamplingParams
from pllm.runtime.backends.cpu import huge_page_memory

PROMPT_TOKENS = 64


def anon_huge_mib() -> float:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) / 1024
    return 0.0


def ordinary_arena(nbytes: int) -> tuple[mmap.mmap, int]:
    """huge_page_memory.huge_page_arena's mapping, the same size and start, asking for ordinary pages instead: what
    the other engine's panels lie in."""
    return huge_page_memory.anonymous_arena(nbytes, huge_pages=False)


def start(build: str, batch: int, huge_pages: bool, ordinary_panels: bool = False):
    swap = (contextlib.nullcontext() if not ordinary_panels else
            unittest.mock.patch.object(huge_page_memory, "huge_page_arena", ordinary_arena))
    with swap:  # the panels are made as the engine warms up and at the first steps
        llm = LLM(build, backend="cpu", kv_cache_memory=1 << 28, huge_pages=huge_pages)
        engine = llm.engine
        rng = random.Random(1)
        for i in range(batch):
            ids = [rng.randrange(100, engine.spec.vocab_size) for _ in range(PROMPT_TOKENS)]
            engine.add_request(f"r{i}", ids, SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True))
        for _ in range(4):  # prefill, then a few decode steps
            engine.step()
    return llm


def measure(build: str, batch: int, rounds: int, steps: int, panels: bool) -> None:
    before = anon_huge_mib()
    huge = start(build, batch, not panels)
    huge_mib = anon_huge_mib() - before
    plain = start(build, batch, False, ordinary_panels=panels)
    plain_mib = anon_huge_mib() - before - huge_mib
    times: dict[str, list[float]] = {"huge pages": [], "mapped": []}
    for _ in range(rounds):
        for name, llm in (("huge pages", huge), ("mapped", plain)):
            t = time.perf_counter()
            for _ in range(steps):
                llm.engine.step()
            times[name].append((time.perf_counter() - t) / steps)
    ratio = statistics.median(m / h for m, h in zip(times["mapped"], times["huge pages"], strict=True))
    plain_name = "ordinary panels" if panels else "mapped"
    cells = "  ".join(f"{name if name != 'mapped' else plain_name} {statistics.median(v) * 1e3:.2f} ms"
                      for name, v in times.items())
    print(f"{Path(build).name:>24}  batch {batch:>2}: {cells}  {plain_name} / huge pages {ratio:.3f}x "
          f"(2 MiB pages backing {huge_mib:.0f} MiB of the huge-pages engine, {plain_mib:.0f} MiB of the other)",
          flush=True)
    huge.close()
    plain.close()
    del huge, plain
    gc.collect()  # the next build's count starts from this one's memory given back


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+")
    ap.add_argument("--batches", default="1", help="comma-separated decode batch sizes")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--panels", action="store_true",
                    help="compare packed weights' panels in huge pages with panels in ordinary pages")
    args = ap.parse_args()
    for build in args.builds:
        for batch in (int(b) for b in args.batches.split(",")):
            measure(build, batch, args.rounds, args.steps, args.panels)


if __name__ == "__main__":
    main()
