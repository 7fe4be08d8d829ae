"""Prefix-affinity routing on Ray Serve against Serve's own power-of-two-choices routing, in the same run.

    python tools/bench_ray_affinity.py --build build/ [--systems 4] [--turns 8] [--concurrency 4] [--rounds 1]

A shared-system-prompt workload: --systems distinct long system prompts, --turns user turns under each, sent in
an interleaved order with --concurrency in flight, as greedy chat completions of --output-len tokens (ignore_eos).
Each round deploys two fresh replicas (one engine each, local Ray, one CPU per replica) once with pllm-serve-ray's
prefix affinity (the default) and once with --no-prefix-affinity (Serve's proxy routes by power of two choices),
taking turns, so both see the same machine. Per mode: the prefix-cache hit rate from each replica's /metrics
(pllm:prefix_cache_hits / pllm:prefix_cache_queries summed over both replicas, each reached by its
x-pllm-replica header), output tokens/s over the wall time of the workload, and how many replicas each system
prompt's turns landed on; then affinity / power-of-two ratios. Ray is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import socket
import statistics
import time
from dataclasses import dataclass

import httpx

METRIC = re.compile(r"^pllm:(prefix_cache_hits|prefix_cache_queries)_total\{[^}]*\} (\S+)$", re.MULTILINE)


@dataclass(frozen=True)
class ModeResult:
    affinity: bool
    hit_rate: float
    output_tokens_per_s: float
    duration_s: float
    num_failed: int
    replicas_per_system: float  # mean number of replicas a system prompt's turns landed on


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def system_prompt(i: int, words: int) -> str:
    rng = random.Random(i)
    vocab = ["answer", "briefly", "cite", "sources", "never", "guess", "prefer", "plain", "words", "check", "units",
             "ask", "when", "unclear", "keep", "tables", "short", "and", "name", "assumptions"]  # fmt: skip
    return f"You are assistant number {i}. Rules: " + " ".join(rng.choice(vocab) for _ in range(words)) + "."


def workload(args) -> list[tuple[int, str, str]]:
    systems = [system_prompt(i, args.system_words) for i in range(args.systems)]
    turns = [(i, systems[i], f"Question {t} for desk {i}: what should I do next?") for t in range(args.turns)
             for i in range(args.systems)]  # fmt: skip
    random.Random(args.seed).shuffle(turns)
    return turns


async def run_workload(url: str, args) -> tuple[float, int, int, dict[int, set[str]]]:
    sem = asyncio.Semaphore(args.concurrency)
    landed: dict[int, set[str]] = {}
    out_tokens = failed = 0

    async def one(http: httpx.AsyncClient, i: int, system: str, user: str) -> None:
        nonlocal out_tokens, failed
        body = {"model": "m", "max_tokens": args.output_len, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}  # fmt: skip
        async with sem:
            r = await http.post(url + "/v1/chat/completions", json=body)
        if r.status_code != 200:
            failed += 1
            return
        out_tokens += r.json()["usage"]["completion_tokens"]
        landed.setdefault(i, set()).add(r.headers["x-pllm-replica"])

    async with httpx.AsyncClient(timeout=600) as http:
        start = time.perf_counter()
        await asyncio.gather(*(one(http, *w) for w in workload(args)))
        return time.perf_counter() - start, out_tokens, failed, landed


def scrape_replicas(url: str, want: int = 2, tries: int = 60) -> dict[str, dict[str, float]]:
    """Each replica's prefix-cache counters: /metrics reaches a replica Serve picks, named by x-pllm-replica."""
    seen: dict[str, dict[str, float]] = {}
    with httpx.Client(timeout=30) as http:
        for _ in range(tries):
            r = http.get(url + "/metrics")
            seen[r.headers["x-pllm-replica"]] = {k: float(v) for k, v in METRIC.findall(r.text)}
            if len(seen) == want:
                break
    if len(seen) < want:
        raise RuntimeError(f"/metrics reached {len(seen)} of {want} replicas in {tries} tries")
    return seen


def run_mode(affinity: bool, port: int, args) -> ModeResult:
    from ray import serve

    from pllm.runtime.server.ray_serve import deployment

    options = {"build_dir": args.build, "served_model_name": ["m"], "kv_cache_memory": args.kv_cache_memory}
    if args.backend:
        options["backend"] = args.backend
    app = deployment(options, affinity, num_replicas=2, ray_actor_options={"num_cpus": 1})
    serve.run(app, name="pllm", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        duration, out_tokens, failed, landed = asyncio.run(run_workload(url, args))
        counters = scrape_replicas(url).values()
    finally:
        serve.delete("pllm")
    hits = sum(c.get("prefix_cache_hits", 0.0) for c in counters)
    queries = sum(c.get("prefix_cache_queries", 0.0) for c in counters)
    return ModeResult(
        affinity=affinity,
        hit_rate=hits / queries if queries else 0.0,
        output_tokens_per_s=out_tokens / duration,
        duration_s=duration,
        num_failed=failed,
        replicas_per_system=statistics.mean(len(v) for v in landed.values()) if landed else 0.0,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build", required=True, help="a pllm build directory (e.g. pllm-compile's default model)")
    p.add_argument("--backend", default=None, help="pllm-serve --backend (default: its auto)")
    p.add_argument("--kv-cache-memory", default="256M")
    p.add_argument("--systems", type=int, default=4, help="distinct system prompts")
    p.add_argument("--system-words", type=int, default=300, help="words in each system prompt")
    p.add_argument("--turns", type=int, default=8, help="user turns per system prompt")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1, help="rounds of (affinity, power of two), taking turns")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per replica; the replicas inherit it
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=bool(os.environ.get("BENCH_RAY_LOGS")))
    results: list[ModeResult] = []
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for r in range(args.rounds):
            for affinity in (True, False) if r % 2 == 0 else (False, True):
                res = run_mode(affinity, port, args)
                results.append(res)
                name = "affinity" if affinity else "pow-2   "
                print(f"round {r}  {name}  hit rate {res.hit_rate:6.1%}  output {res.output_tokens_per_s:7.2f} tok/s  "
                      f"wall {res.duration_s:6.1f} s  replicas/system {res.replicas_per_system:.2f}  "
                      f"failed {res.num_failed}", flush=True)  # fmt: skip
    finally:
        serve.shutdown()
        ray.shutdown()

    def best(affinity: bool) -> ModeResult:
        return max((x for x in results if x.affinity == affinity), key=lambda x: x.output_tokens_per_s)

    a, b = best(True), best(False)
    n = args.systems * args.turns
    shape = f"{args.systems} system prompts x {args.turns} turns, ~{args.system_words} words each"
    print(f"\n{n} chat requests ({shape}), concurrency {args.concurrency}, {args.output_len} output tokens, "
          f"2 replicas; best of {args.rounds} round(s)")  # fmt: skip
    print(f"{'routing':<10} {'hit rate':>9} {'output tok/s':>13} {'replicas/system':>16}")
    for label, x in (("affinity", a), ("pow-2", b)):
        print(f"{label:<10} {x.hit_rate:>9.1%} {x.output_tokens_per_s:>13.2f} {x.replicas_per_system:>16.2f}")
    ratio_hits = a.hit_rate / b.hit_rate if b.hit_rate else float("inf")
    ratio_tps = a.output_tokens_per_s / b.output_tokens_per_s
    print(f"ratio affinity/pow-2: hit rate x{ratio_hits:.2f}, output throughput x{ratio_tps:.2f}")


if __name__ == "__main__":
    main()
