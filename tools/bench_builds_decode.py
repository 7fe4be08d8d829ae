"""Batch-1 decode of several builds of one model, taking turns in one process: which build decodes faster.

    chrt -r 10 python tools/bench_builds_decode.py BUILD_A BUILD_B [BUILD ...] [--rounds 12] [--steps 32] [--batch 1]

Each build is loaded once (LLM, cpu backend) and warmed up; then, round after round, each decodes `--steps` steps of
one fresh request after a DECODE_CONTEXT-token prompt, so minute-to-minute drift in this machine's memory bandwidth
hits every build alike. Prints each build's best and median tok/s, and per build after the first the median and
range of its per-round ratio to the first (the paired figure: each ratio comes from two turns seconds apart). For
comparing two layouts or kernels on the same model (e.g. INT4 against INT4_SYM, or an older compile's build against
a newer one: a build carries its own kernels). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DECODE_CONTEXT = 64  # the prompt before the timed steps, as tools/bench_vs_llamacpp.py's decode row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("builds", nargs="+", type=Path)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch", type=int, default=1, help="sequences decoding together (default 1); rates are tokens/s")
    args = p.parse_args(argv)
    if len(args.builds) < 2:
        p.error("give two builds or more: the first is the baseline of the ratios")
    return args


def main(argv: list[str] | None = None) -> int:
    from bench_throughput import time_decode_steps

    from pllm import LLM

    args = parse_args(argv)
    llms = [LLM(str(b), backend="cpu", kv_cache_memory=1 << 27) for b in args.builds]
    rates: list[list[float]] = [[] for _ in llms]
    try:
        for llm in llms:  # warm-up: packed weights, kernels, first steps
            time_decode_steps(llm, args.batch, DECODE_CONTEXT, {"w": lambda: None}, rounds=1, steps=4)
        for r in range(args.rounds):
            for i, llm in enumerate(llms):
                steps, _ = time_decode_steps(llm, args.batch, DECODE_CONTEXT, {"b": lambda: None}, rounds=1,
                                             steps=args.steps)
                rates[i].append(args.batch / steps["b"][0])
            print(f"round {r + 1}: " + "  ".join(f"{rs[-1]:.1f}" for rs in rates), flush=True)
    finally:
        del llms
        gc.collect()
    print(f"\nbatch-{args.batch} decode tok/s, {args.rounds} rounds of {args.steps} steps, builds taking turns")
    for i, (build, rs) in enumerate(zip(args.builds, rates)):
        line = f"{str(build):50s} best {max(rs):7.1f}  median {statistics.median(rs):7.1f}"
        if i:
            ratios = [a / b for a, b in zip(rs, rates[0])]
            line += (f"  vs first: median {statistics.median(ratios):.3f}x "
                     f"({min(ratios):.3f}-{max(ratios):.3f})")
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
