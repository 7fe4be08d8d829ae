"""KV layer groups: the memory a windowed model saves, and the speed of a model without windows against a baseline.

    python tools/bench_kv_groups.py [--build build/ --baseline-path DIR] [--json out.json]

1. Memory (arithmetic, no model): for Gemma 3 shapes (every 6th layer global, a window of 512 or 1024), the tokens
   of context a KV budget holds when the windowed layers keep only their window (pllm's split) against one pool in
   which every layer keeps the whole context (the baseline: pllm before layer groups, and any engine without them).
2. Host path (with --baseline-path): the engine's per-step host work on a model without windows (SmolLM2's shape:
   one global group) - schedule, snapshot, input tensors and metadata, update - for --num-seqs sequences decoding,
   by this checkout and by the checkout on --baseline-path (a folder holding a `pllm` package), each in its own
   process, taking turns for --rounds rounds. Prints microseconds per step of each and their ratio.
3. Speed (with --build and --baseline-path): greedy generation on a build without windows (SmolLM2: one global
   group) by this checkout and by the checkout on --baseline-path (a folder holding a `pllm` package), each in its
   own process, taking turns for --rounds rounds so drift on a shared machine hits both alike. Prints output
   tokens/s of each and their ratio. A benchmark, not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pllm
from pllm.models.kv_groups import KvGroup
from pllm.runtime.worker.kv_budget import SchedulingLimits, split_budget

GIB = 1 << 30
# (name, layers, kv heads, head_dim, window): Gemma 3 text configs (bf16 KV)
SHAPES = [("gemma3-270m", 18, 1, 256, 512), ("gemma3-1b", 26, 1, 256, 512), ("gemma3-4b", 34, 4, 256, 1024)]

RUN = """
import json, sys, time
from pllm import LLM, SamplingParams
build, num, prompt_len, out_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = LLM(build, backend="cpu", max_num_seqs=num)
prompts = [{"prompt_token_ids": [100 + (7 * i + j) % 1000 for j in range(prompt_len)]} for i in range(num)]
params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
start = time.perf_counter()
outs = llm.generate(prompts, params, use_tqdm=False)
elapsed = time.perf_counter() - start
print(json.dumps({"tokens": sum(len(o.outputs[0].token_ids) for o in outs), "seconds": elapsed}))
"""


HOST = """
import json, sys, time, types
import torch
from pllm.runtime.engine.request import Request
from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.engine.scheduler import Scheduler
from pllm.runtime.engine.kv_cache import KVCacheManager
num_seqs, num_steps = int(sys.argv[1]), int(sys.argv[2])
manager = KVCacheManager(num_seqs * 64, 16)
try:  # this checkout: a coordinator over one group, and the module that builds step inputs
    from pllm.runtime.engine.kv_coordinator import KvCoordinator
    from pllm.runtime.worker.step_inputs import prepare_step
    kv = KvCoordinator((manager,))
    prepare = lambda batch: prepare_step(batch, 16, (num_seqs * 64,), torch.device("cpu"))
except ImportError:  # the baseline: one manager, the runner's prepare
    from pllm.runtime.worker.model_runner import ModelRunner
    kv = manager
    runner = types.SimpleNamespace(block_size=16, device=torch.device("cpu"))
    prepare = lambda batch: ModelRunner.prepare(runner, batch)
sched = Scheduler(kv, num_seqs, 8192, 4096, (0,))
params = SamplingParams(temperature=0.0, max_tokens=num_steps + 10, ignore_eos=True)
for i in range(num_seqs):
    r = Request(str(i), [100 + (i + j) % 1000 for j in range(200)], params, 0.0, num_steps + 10)
    sched.add_request(r)
batch = sched.schedule()  # the prefills
sched.update(batch, {s.request.request_id: 1 for s in batch.seqs})
start = time.perf_counter()
for step in range(num_steps):
    batch = sched.schedule()
    prepare(batch.snapshot(sched.stop))
    sched.update(batch, {s.request.request_id: 1 for s in batch.seqs})
print(json.dumps({"us_per_step": (time.perf_counter() - start) / num_steps * 1e6}))
"""


def host(baseline: str, rounds: int, num_seqs: int, num_steps: int) -> dict:
    here = str(Path(pllm.__file__).parent.parent)  # the folder this process imported `pllm` from
    results: dict[str, list[float]] = {"baseline": [], "this": []}
    for _ in range(rounds):
        for label, path in (("baseline", baseline), ("this", here)):
            out = subprocess.run([sys.executable, "-c", HOST, str(num_seqs), str(num_steps)],
                                 env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, check=True)
            results[label].append(json.loads(out.stdout.strip().splitlines()[-1])["us_per_step"])
            print(f"  {label:8s} {results[label][-1]:9.1f} us/step", flush=True)
    best = {k: min(v) for k, v in results.items()}
    return {"us_per_step": results, "best": best, "ratio_best": best["this"] / best["baseline"]}


def memory_table(budget: int, max_num_seqs: int, block_size: int = 16) -> list[dict]:
    rows = []
    for name, num_layers, kv_heads, head_dim, window in SHAPES:
        layer_block_bytes = 2 * block_size * kv_heads * head_dim * 2  # k and v, bf16
        global_layers = tuple(i for i in range(num_layers) if (i + 1) % 6 == 0)
        groups = (KvGroup(global_layers, None), KvGroup(tuple(i for i in range(num_layers) if (i + 1) % 6), window))
        limits = SchedulingLimits(max_num_seqs, 2048, 32768)
        glob, win = split_budget(groups, layer_block_bytes, budget, limits, block_size)
        one_pool = budget // (num_layers * layer_block_bytes) - 1
        rows.append(dict(model=name, window=window, global_layers=len(global_layers), layers=num_layers,
                         one_pool_tokens=one_pool * block_size, split_tokens=glob.num_blocks * block_size,
                         windowed_mib=win.num_bytes / 2**20, ratio=glob.num_blocks / one_pool))
    return rows


def speed(build: str, baseline: str, rounds: int, num: int, prompt_len: int, out_len: int) -> dict:
    here = str(Path(pllm.__file__).parent.parent)  # the folder this process imported `pllm` from
    results: dict[str, list[float]] = {"baseline": [], "this": []}
    for _ in range(rounds):
        for label, path in (("baseline", baseline), ("this", here)):
            env = {**os.environ, "PYTHONPATH": path}
            out = subprocess.run([sys.executable, "-c", RUN, build, str(num), str(prompt_len), str(out_len)],
                                 env=env, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[label].append(r["tokens"] / r["seconds"])
            print(f"  {label:8s} {results[label][-1]:8.1f} tokens/s", flush=True)
    best = {k: max(v) for k, v in results.items()}
    return {"tokens_per_s": results, "best": best, "ratio_best": best["this"] / best["baseline"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-gib", type=float, default=4.0)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--build", default=None)
    ap.add_argument("--baseline-path", default=None, help="a folder holding the baseline `pllm` package")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-seqs", type=int, default=64, help="host path: sequences decoding")
    ap.add_argument("--num-steps", type=int, default=200, help="host path: decode steps timed")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    report: dict = {}
    rows = memory_table(int(args.budget_gib * GIB), args.max_num_seqs)
    report["memory"] = rows
    print(f"KV budget {args.budget_gib} GiB (bf16, {args.max_num_seqs} sequences): tokens of context held")
    print(f"{'model':14s} {'window':>6s} {'global':>8s} {'one pool':>10s} {'split':>10s} {'windowed MiB':>12s} "
          f"{'ratio':>6s}")
    for r in rows:
        print(f"{r['model']:14s} {r['window']:6d} {r['global_layers']:>3d}/{r['layers']:<4d} "
              f"{r['one_pool_tokens']:10d} {r['split_tokens']:10d} {r['windowed_mib']:12.1f} {r['ratio']:6.2f}")
    if args.baseline_path:
        print(f"\nhost path per decode step ({args.num_seqs} sequences, one global group):")
        report["host"] = h = host(args.baseline_path, args.rounds, args.num_seqs, args.num_steps)
        print(f"best: baseline {h['best']['baseline']:.1f}, this {h['best']['this']:.1f} us/step; "
              f"ratio {h['ratio_best']:.3f}")
    if args.build and args.baseline_path:
        print(f"\nspeed on {args.build} ({args.num_requests} requests, {args.prompt_len} + {args.output_len} tokens):")
        report["speed"] = speed(args.build, args.baseline_path, args.rounds, args.num_requests, args.prompt_len,
                                args.output_len)
        s = report["speed"]
        print(f"best: baseline {s['best']['baseline']:.1f}, this {s['best']['this']:.1f} tokens/s; "
              f"ratio {s['ratio_best']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
