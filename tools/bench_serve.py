"""Serving benchmark: a concurrency sweep of streaming completions against an OpenAI-compatible server on loopback.

    python tools/bench_serve.py --url http://127.0.0.1:8000 [--concurrency 1,4,16] [--num-requests 64]
    python tools/bench_serve.py --build build/ [--serve-arg=--backend=cpu ...]   # launches pllm-serve itself

Each level sends --num-requests requests (fresh random token-id prompts of --input-len, greedy, ignore_eos,
--output-len tokens) with at most C in flight, and stops after --max-duration-s. Metrics follow vLLM's `bench serve`
(performance-anchors.md section 1.1), all client-side: TTFT = first content chunk - send; ITL = gaps between
content chunks, pooled over requests; TPOT = (e2e - TTFT) / (output tokens - 1) per request; request/s and output
tokens/s = completed / wall time of the level. The ratio column compares each level's output tokens/s with
concurrency 1 of the same run (the baseline beside it). Writes <out>.json and <out>.png (if matplotlib is there).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

MAX_REQUESTS = 10_000
MAX_CONCURRENCY = 1024


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    latency_s: float = 0.0
    num_output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""


@dataclass(frozen=True)
class LevelStats:
    concurrency: int
    num_completed: int
    num_failed: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_ms: tuple[float, float]  # p50, p99
    tpot_ms: tuple[float, float]
    itl_ms: tuple[float, float]
    e2e_ms: tuple[float, float]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        sys.exit(f"bench_serve: --url {url!r}: only loopback servers (127.0.0.1, ::1, localhost) are benchmarked")


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    start = time.perf_counter()
    stamps: list[float] = []
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return RequestResult(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(False, error=str(chunk["error"])[:200])
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                if any(c.get("text") for c in chunk.get("choices", [])):
                    stamps.append(time.perf_counter())
    except httpx.HTTPError as exc:
        return RequestResult(False, error=repr(exc)[:200])
    if not stamps:
        return RequestResult(False, error="no content chunks")
    ttft = stamps[0] - start
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    return RequestResult(True, ttft, stamps[-1] - start, usage_tokens or len(stamps), itl)


async def run_level(args, url: str, prompts: list[list[int]], concurrency: int) -> LevelStats:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    results: list[RequestResult] = []
    async with httpx.AsyncClient(timeout=args.max_duration_s, limits=limits, headers=headers) as client:

        async def worker(prompt: list[int]) -> None:
            async with sem:
                body = {
                    "model": args.model, "prompt": prompt, "max_tokens": args.output_len, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                }  # fmt: skip
                results.append(await one_request(client, url, body))

        start = time.perf_counter()
        tasks = [asyncio.create_task(worker(p)) for p in prompts]
        done, pending = await asyncio.wait(tasks, timeout=args.max_duration_s)
        for t in pending:  # bounded in time: whatever is left is cancelled (the server aborts it)
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"  c={concurrency}: {len(failed)} failed, e.g. {failed[0].error}", file=sys.stderr)
    tpot = [(r.latency_s - r.ttft_s) / (r.num_output_tokens - 1) for r in ok if r.num_output_tokens > 1]
    itl = [x for r in ok for x in r.itl_s]

    def p50_p99(values: list[float]) -> tuple[float, float]:
        return (1e3 * percentile(values, 50), 1e3 * percentile(values, 99))

    return LevelStats(
        concurrency=concurrency,
        num_completed=len(ok),
        num_failed=len(failed) + len(pending),
        duration_s=duration,
        requests_per_s=len(ok) / duration,
        output_tokens_per_s=sum(r.num_output_tokens for r in ok) / duration,
        ttft_ms=p50_p99([r.ttft_s for r in ok]),
        tpot_ms=p50_p99(tpot),
        itl_ms=p50_p99(itl),
        e2e_ms=p50_p99([r.latency_s for r in ok]),
    )


def print_table(levels: list[LevelStats]) -> None:
    base = levels[0].output_tokens_per_s if levels else 0.0
    head = (
        f"{'conc':>5} {'done':>5} {'req/s':>7} {'out tok/s':>10} {'x c1':>6} {'TTFT p50':>9} {'p99':>8} "
        f"{'TPOT p50':>9} {'p99':>8} {'ITL p50':>8} {'p99':>8} {'E2E p50':>9}   (ms)"
    )
    print(head)
    for s in levels:
        ratio = s.output_tokens_per_s / base if base else float("nan")
        print(
            f"{s.concurrency:>5} {s.num_completed:>5} {s.requests_per_s:>7.2f} {s.output_tokens_per_s:>10.1f} "
            f"{ratio:>6.2f} {s.ttft_ms[0]:>9.1f} {s.ttft_ms[1]:>8.1f} {s.tpot_ms[0]:>9.2f} {s.tpot_ms[1]:>8.2f} "
            f"{s.itl_ms[0]:>8.2f} {s.itl_ms[1]:>8.2f} {s.e2e_ms[0]:>9.1f}"
        )


def plot(levels: list[LevelStats], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    conc = [s.concurrency for s in levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(conc, [s.output_tokens_per_s for s in levels], "o-", label="output tok/s")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("concurrency")
    ax1.set_ylabel("output tokens/s")
    ax1.grid(True, alpha=0.3)
    for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms")):
        ax2.plot(conc, [getattr(s, key)[0] for s in levels], "o-", label=f"{name} p50")
        ax2.plot(conc, [getattr(s, key)[1] for s in levels], "x--", alpha=0.6, label=f"{name} p99")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("concurrency")
    ax2.set_ylabel("ms")
    ax2.legend(fontsize=8)
    ax2.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def launch_server(build: str, serve_args: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "pllm-serve"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pllm.runtime.server"]
    cmd += [build, "--host", "127.0.0.1", "--port", str(port), "--disable-access-log", *serve_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"bench_serve: pllm-serve exited with {proc.returncode} (run it by hand to see why)")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("bench_serve: pllm-serve did not become healthy in 120 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="base URL of a running server on loopback, e.g. http://127.0.0.1:8000")
    src.add_argument("--build", help="a build directory: launch pllm-serve on a free loopback port")
    p.add_argument("--serve-arg", action="append", default=[], help="extra pllm-serve flag (repeatable)")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated levels")
    p.add_argument("--num-requests", type=int, default=64, help="requests per level")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-token-id", type=int, default=256, help="prompt token ids are drawn from [3, this)")
    p.add_argument("--max-duration-s", type=float, default=120.0, help="per level; the rest is cancelled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_serve", help="writes <out>.json and <out>.png")
    args = p.parse_args(argv)
    levels = sorted({int(c) for c in args.concurrency.split(",")})
    if not 1 <= args.num_requests <= MAX_REQUESTS or not all(1 <= c <= MAX_CONCURRENCY for c in levels):
        sys.exit(f"bench_serve: num-requests must be in [1, {MAX_REQUESTS}], concurrency in [1, {MAX_CONCURRENCY}]")
    proc = None
    if args.build:
        proc, base = launch_server(args.build, args.serve_arg)
    else:
        base = args.url.rstrip("/")
        check_loopback(base)
    try:
        if args.model is None:
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            args.model = httpx.get(f"{base}/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
        rng = random.Random(args.seed)

        def fresh_prompts(n: int) -> list[list[int]]:
            return [[rng.randrange(3, args.max_token_id) for _ in range(args.input_len)] for _ in range(n)]

        url = f"{base}/v1/completions"
        asyncio.run(run_level(args, url, fresh_prompts(2), 1))  # warm-up, not reported
        stats = []
        for c in levels:  # fresh prompts per level: a prompt the server has seen would be a prefix-cache hit
            stats.append(asyncio.run(run_level(args, url, fresh_prompts(args.num_requests), c)))
            print(f"  c={c}: {stats[-1].num_completed} done in {stats[-1].duration_s:.1f} s", file=sys.stderr)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    title = f"{args.model}: in {args.input_len} / out {args.output_len} tokens, {args.num_requests} requests per level"
    print(title)
    print_table(stats)
    out = Path(args.out)
    config = {k: v for k, v in vars(args).items() if k != "api_key"}
    out.with_suffix(".json").write_text(json.dumps({"config": config, "levels": [asdict(s) for s in stats]}, indent=1))
    empty = [s.concurrency for s in stats if s.num_completed == 0]
    if empty:  # nothing to plot there (a wrong --model, a server down): the errors were printed as they came
        print(f"bench_serve: no request completed at concurrency {', '.join(map(str, empty))} (errors above); "
              f"wrote {out.with_suffix('.json')}", file=sys.stderr)
        return 1
    if plot(stats, out.with_suffix(".png"), title):
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
