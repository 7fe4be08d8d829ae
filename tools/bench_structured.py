"""Structured output's cost: TPOT and throughput with and without a JSON schema, at batch 1 and 32, same run.

    python tools/bench_structured.py build/ [--output-len 128] [--backend cpu] [--rounds 2]

Each batch size runs free and constrained requests in turns (rounds), the same prompts and output lengths: the
schema cannot end before max_tokens (a list of at least 10,000 short strings), so both runs decode exactly as many
tokens and the difference is the grammar's (the per-step bitmask and its application in the sampler). The grammar
is compiled before timing starts, as a server compiles it before queueing. TPOT is each request's (finished -
first token) / (tokens - 1), median over requests; throughput is output tokens over the run's wall time. Prints
best-of-rounds figures and the ratios (the target: under 10% slower). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "notes": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 10000},
    },
    "required": ["title", "notes"],
}
PROMPT = "Write a JSON object with a title and a long list of short notes about paged attention: "


def run(llm, batch: int, output_len: int, constrained: bool) -> tuple[float, float]:
    """(median TPOT in ms, output tokens/s) for one batch of identical-length requests."""
    from pllm import SamplingParams, StructuredOutputsParams

    spec = StructuredOutputsParams(json=SCHEMA) if constrained else None
    params = SamplingParams(temperature=0.8, seed=0, max_tokens=output_len, ignore_eos=True, structured_outputs=spec)
    prompts = [f"{PROMPT}{i}" for i in range(batch)]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = [len(o.outputs[0].token_ids) for o in outs]
    assert all(n == output_len for n in tokens), f"outputs ended early: {tokens}"
    tpots = [(o.metrics["finished_time"] - o.metrics["first_token_time"]) / (output_len - 1) for o in outs]
    return 1000 * statistics.median(tpots), sum(tokens) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()

    from pllm import LLM, StructuredOutputsParams

    llm = LLM(args.build, backend=args.backend, max_num_seqs=64)
    llm.engine.grammars.compile(StructuredOutputsParams(json=SCHEMA)).result()
    for constrained in (False, True):  # warm-up
        run(llm, 2, 8, constrained)
    print(f"backend={llm.engine.runner.backend} dtype={llm.engine.build.dtype} output_len={args.output_len}")
    print("| batch | TPOT free (ms) | TPOT schema (ms) | TPOT ratio | tok/s free | tok/s schema | throughput ratio |")
    print("|---|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        best: dict[bool, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for constrained in (False, True):
                tpot, tps = run(llm, batch, args.output_len, constrained)
                old = best.get(constrained, (float("inf"), 0.0))
                best[constrained] = (min(old[0], tpot), max(old[1], tps))
        (tpot_f, tps_f), (tpot_s, tps_s) = best[False], best[True]
        print(f"| {batch} | {tpot_f:.2f} | {tpot_s:.2f} | {tpot_s / tpot_f:.3f} | {tps_f:.1f} | {tps_s:.1f} | "
              f"{tps_s / tps_f:.3f} |")


if __name__ == "__main__":
    main()
