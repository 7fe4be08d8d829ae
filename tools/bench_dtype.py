"""bf16 against fp32 on this CPU: the evidence behind `pllm-compile --dtype auto`.

    python tools/bench_dtype.py FP32_BUILD BF16_BUILD [--batches 1,16] [--rounds 5] [--steps 8]

Both builds of the same model load side by side on the cpu backend. Per round, each takes its turn: decode-only
steps at each batch size (tools/bench_throughput.time_decode_steps, context 128 tokens) and one 512-token prefill,
so drift on a shared machine hits both alike. Prints the median ms per step and tokens/s of each, and bf16's
speed-up over fp32; also the CPU's flags that --dtype auto reads. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from bench_throughput import time_decode_steps

from pllm import LLM, SamplingParams
from pllm.compiler.dtype_choice import NATIVE_BF16_FLAGS, choose_dtype, host_cpu_flags

PREFILL_TOKENS = 512


def prefill_seconds(llm: LLM, rng: random.Random) -> float:
    vocab = llm.engine.spec.vocab_size
    prompt = {"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(PREFILL_TOKENS)]}  # no prefix hits
    t = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fp32_build")
    ap.add_argument("bf16_build")
    ap.add_argument("--batches", default="1,16", help="comma-separated decode batch sizes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    builds = {"float32": args.fp32_build, "bfloat16": args.bf16_build}
    for dtype, path in builds.items():
        found = json.loads((Path(path) / "manifest.json").read_text())["dtype"]
        if found != dtype:
            raise SystemExit(f"{path}: a {found} build, expected {dtype}")
    flags = sorted(host_cpu_flags() & {f for fs in NATIVE_BF16_FLAGS.values() for f in fs})
    print(f"native bf16 flags here: {flags or 'none'}; --dtype auto picks {choose_dtype('auto', 'float32', False)}")
    llms = {dtype: LLM(path, backend="cpu", kv_cache_memory=1 << 28, max_num_batched_tokens=PREFILL_TOKENS)
            for dtype, path in builds.items()}
    decode: dict[str, dict[int, list[float]]] = {d: {b: [] for b in batches} for d in llms}
    prefill: dict[str, list[float]] = {d: [] for d in llms}
    rng = random.Random(0)
    for llm in llms.values():  # warm-up: packed weights, oneDNN primitives
        prefill_seconds(llm, rng)
    for r in range(args.rounds):
        for dtype, llm in llms.items():
            for b in batches:
                times, _ = time_decode_steps(llm, b, 128, {dtype: lambda: None}, rounds=1, steps=args.steps)
                decode[dtype][b] += times[dtype]
            prefill[dtype].append(prefill_seconds(llm, rng))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    results = {}
    print(f"\nmedian over {args.rounds} rounds")
    for b in batches:
        med = {d: statistics.median(decode[d][b]) for d in llms}
        results[f"decode_batch_{b}"] = {d: {"step_ms": med[d] * 1e3, "tok_s": b / med[d]} for d in llms}
        print(f"decode batch {b:>3}: fp32 {med['float32'] * 1e3:7.1f} ms/step  bf16 {med['bfloat16'] * 1e3:7.1f} "
              f"ms/step  bf16 speed-up {med['float32'] / med['bfloat16']:.2f}x")
    med = {d: statistics.median(prefill[d]) for d in llms}
    results["prefill_512"] = {d: {"seconds": med[d], "tok_s": PREFILL_TOKENS / med[d]} for d in llms}
    print(f"prefill {PREFILL_TOKENS}:     fp32 {PREFILL_TOKENS / med['float32']:7.0f} tok/s    bf16 "
          f"{PREFILL_TOKENS / med['bfloat16']:7.0f} tok/s    bf16 speed-up {med['float32'] / med['bfloat16']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
