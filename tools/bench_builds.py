"""Decode and prefill speed of several builds of one model (e.g. bf16 against its --quantization builds), same run.

    python tools/bench_builds.py BASE_BUILD OTHER_BUILD [...] [--batches 1,16] [--rounds 3] [--steps 8]
                                 [--prefills 1x512,16x128,1x2048]

All builds load side by side on the cpu backend. Per round, each takes its turn: decode-only steps at each batch
size (tools/bench_throughput.time_decode_steps, context 128 tokens; --batches "" for none) and one prefill of each
--prefills shape (N prompts of L random tokens in one generate call, one output token each; the default one
512-token prompt), so drift on a shared machine hits all alike. Prints the median ms per step and tokens/s of
each, and each one's speed-up over the first. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench_dtype import PREFILL_TOKENS, prefill_seconds
from bench_throughput import time_decode_steps

from pllm import LLM, SamplingParams


def main() -> None:
    import random

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+")
    ap.add_argument("--batches", default="1,16", help="comma-separated decode batch sizes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prefills", default=f"1x{PREFILL_TOKENS}",
                    help="comma-separated prefill shapes, prompts x tokens (e.g. 16x128: 16 prompts of 128 tokens)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.prefills.split(",") if shape]
    most = max([PREFILL_TOKENS, *(n * length for n, length in shapes)])
    llms = {path: LLM(path, backend="cpu", kv_cache_memory=1 << 28, max_num_batched_tokens=most)
            for path in args.builds}
    decode: dict[str, dict[int, list[float]]] = {p: {b: [] for b in batches} for p in llms}
    prefill: dict[str, dict[tuple, list[float]]] = {p: {shape: [] for shape in shapes} for p in llms}
    rng = random.Random(0)
    for llm in llms.values():  # warm-up: packed weights, oneDNN primitives
        prefill_seconds(llm, rng)
    for r in range(args.rounds):
        for path, llm in llms.items():
            for b in batches:
                times, _ = time_decode_steps(llm, b, 128, {path: lambda: None}, rounds=1, steps=args.steps)
                decode[path][b] += times[path]
            for shape in shapes:
                prefill[path][shape].append(prompts_seconds(llm, rng, *shape))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    base = args.builds[0]
    print(f"\nmedian over {args.rounds} rounds; speed-up against {base}")
    for b in batches:
        for path in llms:
            med = statistics.median(decode[path][b])
            print(f"decode batch {b:>3}  {path:<28} {med * 1e3:8.1f} ms/step {b / med:8.1f} tok/s  "
                  f"{statistics.median(decode[base][b]) / med:5.2f}x")
    for n, length in shapes:
        for path in llms:
            med = statistics.median(prefill[path][(n, length)])
            print(f"prefill {n:>3} x {length:<5} {path:<28} {med * 1e3:8.1f} ms {n * length / med:8.0f} tok/s  "
                  f"{statistics.median(prefill[base][(n, length)]) / med:5.2f}x")


def prompts_seconds(llm: LLM, rng, n: int, length: int) -> float:
    """Seconds to prefill n prompts of `length` random tokens (no prefix hits) in one generate call, one output
    token each."""
    vocab = llm.engine.spec.vocab_size
    prompts = [{"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(length)]} for _ in range(n)]
    t = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
