"""Speculative decoding by n-gram lookup against plain decoding, one request at a time, on input-grounded prompts.

    python tools/bench_spec.py build/ [--rounds 3] [--max-tokens 160] [--k 4] [--lookup 2,4] [--json out.json]

Four chat tasks over the text shipped in tools/data/spec_text.txt (repeat it, edit it, summarise it, copy it into a
JSON object under a JSON schema, so with structured output): the output copies long runs of its input, which is
where prompt lookup drafts well. Two engines of the same build, one with
speculative_config and one without, take turns request by request (the order flips every round), so load on a shared
machine hits both alike. Each request runs alone (batch 1), greedy, prefix caching off so every round does the same
work. Prints per task and overall: the median output tokens/s of each over the requests, the median of the paired
speed-ups (each request with speculation over the plain one next to it; a stall of the shared machine hits one pair,
not the figure), the draft acceptance rate, mean tokens per step of a verified sequence, and whether the two engines'
token ids were identical. In float32 they must be (greedy output is the same with speculation on and off). In bf16 a
verify step's rows are computed in other shapes than one-token steps, and where two tokens' logits are tied or nearly
so in bf16, either may win, as chunked prefill or batching can already flip them: so for a task whose outputs differ the
script reports where, and the gap between the two tokens' logprobs there, scored by the plain engine (not timed).
A benchmark, not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from pllm import LLM, SamplingParams, StructuredOutputsParams

TEXT = (Path(__file__).parent / "data" / "spec_text.txt").read_text().strip()
TASKS = {
    "repeat": f"Repeat the following text word for word, without any comment.\n\n{TEXT}",
    "edit": "Rewrite the following text, changing only 'village library' to 'town library' and 'ten cents' to "
            f"'twenty cents'. Keep everything else as it is.\n\n{TEXT}",
    "summarise": f"Summarise the following text in a few sentences, keeping its wording where you can.\n\n{TEXT}",
    "json": "Copy the following text word for word into a JSON object of the form {\"text\": \"...\"}, and write "
            f"nothing else.\n\n{TEXT}",
}
# tasks whose output is constrained (structured output): guesses are cut by the grammar, each row masked
SCHEMAS = {"json": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}


def run_one(llm: LLM, prompt: str, params: SamplingParams) -> tuple[list[int], float, list[int]]:
    """(output token ids, seconds, prompt token ids) of one chat request run alone."""
    start = time.perf_counter()
    out = llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)[0]
    return out.outputs[0].token_ids, time.perf_counter() - start, out.prompt_token_ids


def divergence(llm: LLM, ids: list[int], off: list[int], on: list[int]) -> dict | None:
    """Where two greedy outputs first differ, and the plain engine's logprobs of both tokens there."""
    at = next((i for i, (a, b) in enumerate(zip(off, on)) if a != b), None)
    if at is None:
        return None if len(off) == len(on) else {"position": min(len(off), len(on)), "gap": None}
    scored = llm.generate({"prompt_token_ids": ids + off[:at]}, SamplingParams(temperature=0.0, max_tokens=1,
                                                                              logprobs=20), use_tqdm=False)
    top = {t: lp.logprob for t, lp in scored[0].outputs[0].logprobs[0].items()}
    gap = top[off[at]] - top[on[at]] if off[at] in top and on[at] in top else None
    return {"position": at, "gap": gap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build_dir")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--lookup", default="2,4", help="prompt_lookup_min,prompt_lookup_max")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (cpu): one, so no OpenMP barrier waits on a "
                    "core another job holds")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    unknown = set(args.tasks.split(",")) - set(TASKS)
    if unknown:
        ap.error(f"--tasks: unknown {', '.join(sorted(unknown))}; known: {', '.join(TASKS)}")
    tasks = {t: TASKS[t] for t in args.tasks.split(",")}
    low, high = (int(x) for x in args.lookup.split(","))
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": low, "prompt_lookup_max": high}
    common = dict(backend=args.backend, max_num_seqs=1, enable_prefix_caching=False, max_model_len=1024,
                  kv_cache_memory=64 << 20, num_threads=args.threads)
    engines = {"off": LLM(args.build_dir, **common), "on": LLM(args.build_dir, **common, speculative_config=spec)}
    plain = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    task_params = {task: SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                        structured_outputs=StructuredOutputsParams(json=SCHEMAS[task]))
                   if task in SCHEMAS else plain for task in tasks}
    for llm in engines.values():  # warm-up: first-call costs (and each schema's compilation) out of the timings
        run_one(llm, "Hello", SamplingParams(temperature=0.0, max_tokens=8))
        for schema in SCHEMAS.values():
            run_one(llm, "Hello", SamplingParams(temperature=0.0, max_tokens=8,
                                                 structured_outputs=StructuredOutputsParams(json=schema)))
    stats = engines["on"].engine.scheduler.spec_stats
    rates: dict[tuple[str, str], list[float]] = {(task, mode): [] for task in tasks for mode in engines}  # tok/s
    num_tokens = {task: 0 for task in tasks}
    accepted = {task: [0, 0, 0] for task in tasks}  # drafts (verify steps), draft tokens, accepted tokens
    identical = {task: True for task in tasks}
    diverged: dict[str, dict] = {}
    for r in range(args.rounds):
        for task, prompt in tasks.items():
            outputs = {}
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                before = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens)
                outputs[mode], seconds, prompt_ids = run_one(engines[mode], prompt, task_params[task])
                rates[task, mode].append(len(outputs[mode]) / seconds)
                num_tokens[task] += len(outputs[mode]) if mode == "on" else 0
                if mode == "on":
                    after = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens)
                    accepted[task] = [a + (x - y) for a, x, y in zip(accepted[task], after, before, strict=True)]
            identical[task] &= outputs["on"] == outputs["off"]
            if outputs["on"] != outputs["off"] and task not in diverged:
                diverged[task] = divergence(engines["off"], prompt_ids, outputs["off"], outputs["on"])
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    rows = []
    for task in [*tasks, "all"]:
        keys = list(tasks) if task == "all" else [task]
        off = [x for t in keys for x in rates[t, "off"]]
        on = [x for t in keys for x in rates[t, "on"]]
        drafts, drafted, acc = (sum(accepted[t][i] for t in keys) for i in range(3))
        rows.append({
            "task": task,
            "off_tok_s": statistics.median(off),
            "on_tok_s": statistics.median(on),
            "speedup": statistics.median(b / a for a, b in zip(off, on, strict=True)),
            "speedup_range": [min(b / a for a, b in zip(off, on)), max(b / a for a, b in zip(off, on))],
            "acceptance_rate": acc / drafted if drafted else 0.0,
            "mean_tokens_per_verify": 1 + acc / drafts if drafts else 0.0,
            "output_tokens_per_request": sum(num_tokens[t] for t in keys) / (args.rounds * len(keys)),
            "identical": all(identical[t] for t in keys),
        })
    print(f"\nbuild {args.build_dir}, k={args.k}, lookup n {low}..{high}, {args.rounds} rounds, batch 1, greedy, "
          f"{args.threads} thread(s); medians")
    print(f"{'task':<10} {'off tok/s':>9} {'on tok/s':>9} {'speed-up':>8} {'(range)':>13} {'accept':>7} "
          f"{'tok/verify':>10} {'out tok':>7}  identical")
    for row in rows:
        slow, fast = row["speedup_range"]
        print(f"{row['task']:<10} {row['off_tok_s']:>9.1f} {row['on_tok_s']:>9.1f} {row['speedup']:>7.2f}x "
              f"{f'{slow:.2f}-{fast:.2f}x':>13} "
              f"{100 * row['acceptance_rate']:>6.1f}% {row['mean_tokens_per_verify']:>10.2f} "
              f"{row['output_tokens_per_request']:>7.0f}  {row['identical']}")
    for task, where in diverged.items():
        gap = "n/a" if where["gap"] is None else f"{where['gap']:.4f}"
        print(f"{task}: outputs differ from token {where['position']}; logprob gap there (plain engine): {gap}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "diverged": diverged}, indent=2))


if __name__ == "__main__":
    main()
