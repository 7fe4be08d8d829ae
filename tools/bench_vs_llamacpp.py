"""pllm against llama.cpp on this machine, in one sitting: batch-1 decode, prefill and serving, side by side.

    python tools/bench_vs_llamacpp.py [--models smollm2,llama1b] [--rows decode,prefill,serve]
                                      [--precisions bf16,int8,int4,int4g128,gguf-q8_0,gguf-q4_0]
                                      [--concurrency 1,4,16] [--decode-depths 2000] [--quick]

llama.cpp's binaries are found (--llama-cpp-bin, PATH) or built once into --cache from the llama-cpp-python sdist
(tools/llamacpp.py). Models:
- smollm2: the default GGUF (SmolLM2-135M-Instruct, Q4_1, from compiler/source.py's default_gguf_path). llama.cpp's
  BF16 file is that Q4_1 file re-quantised by llama-quantize --allow-requantize (the only bf16 source here: the
  weights are the Q4_1 values, as in pllm's bf16 build of the same file); Q8_0, Q4_0 and Q4_K come from that BF16.
- llama1b: a TinyLlama-shaped 1.1B model with random weights made here (tools/random_llama.py), converted to GGUF
  by llama.cpp's convert_hf_to_gguf.py; pllm compiles the HF folder.
Rows (pllm / llama.cpp, both with --threads threads):
- decode: batch-1 decode tok/s; pllm in-process (decode-only engine steps at a 64-token context), llama.cpp's
  llama-bench tg. bf16 vs BF16, int8 vs Q8_0, int4 (groups of 32: 5 bits a weight, Q4_1's size) and int4g128
  (groups of 128: 4.25 bits a weight) vs Q4_0 and Q4_K. pllm's quantised builds use `pllm-compile --quantization
  int8|int4 [--quant-group-size 128]`; where pllm-compile refuses that flag, the rows say "not available".
  gguf-q8_0 and gguf-q4_0: pllm compiles llama.cpp's own Q8_0 / Q4_0 file with `--quantization gguf`, keeping its
  blocks, so both sides read the same layer bytes. The LM head too where it is Q8_0 (SmolLM2's tied one); a Q6_K
  output (the 1.17B model's Q4_0 file) pllm re-quantises to its int8 head (8.5 bits a weight against 6.56).
  With --decode-depths, the decode rows also at those contexts: pllm's steps with that long a prompt before them,
  llama-bench tg after -d that many tokens (a chat's history: the attention then reads its K and V every token).
- prefill: tok/s of a 512-token prompt, at each precision as decode; pllm one 512-token prefill in-process,
  llama-bench pp512.
- serve: tools/bench_serve.py's streaming client against pllm-serve and llama-server (bf16 builds), the same
  random token-id prompts (fresh at each level, so neither server's prefix cache holds them), greedy, ignore_eos,
  --output-len tokens; the two servers take turns level by level.
Ratios are pllm / llama.cpp; the targets of issue 15 print beside them. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import signal
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from types import SimpleNamespace

import llamacpp
from bench_models import LLAMA_TYPES, Prepared, prepare_model

MODELS = ("smollm2", "llama1b")
ROWS = ("decode", "prefill", "serve")
PRECISIONS = ("bf16", "int8", "int4", "int4g128", "gguf-q8_0", "gguf-q4_0")
PREFILL_TOKENS = 512
DECODE_CONTEXT = 64


class Goal(Enum):
    AT_LEAST = ">="  # pllm / llama.cpp must reach the ratio (throughput)
    AT_MOST = "<="  # pllm / llama.cpp must stay under it (latency)


@dataclass(frozen=True)
class Target:
    goal: Goal
    ratio: float

    def met(self, ratio: float) -> bool:
        return ratio >= self.ratio if self.goal is Goal.AT_LEAST else ratio <= self.ratio

    def __str__(self) -> str:
        return f"{self.goal.value}{self.ratio:g}x"


@dataclass(frozen=True)
class Row:
    model: str
    metric: str  # e.g. "decode b1 tok/s", "serve c16 out tok/s"
    pllm_weights: str  # precision on each side, e.g. "int4" / "Q4_K"
    llama_weights: str
    pllm: float | None  # None: not measured, `note` says why
    llama: float | None
    target: Target | None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.pllm / self.llama if self.pllm is not None and self.llama else None


@dataclass(frozen=True)
class Measured:
    """One pllm figure, or why there is none."""

    value: float | None
    why_not: str = ""


def serve_targets(concurrency: int) -> tuple[Target | None, Target | None]:
    """(output tok/s, TTFT p50) targets: batch-1 through the servers >= 1.2x; concurrency 8-16 >= 2x with TTFT no
    worse; none in between."""
    if concurrency == 1:
        return Target(Goal.AT_LEAST, 1.2), None
    if concurrency >= 8:
        return Target(Goal.AT_LEAST, 2.0), Target(Goal.AT_MOST, 1.0)
    return None, None


def format_table(rows: list[Row]) -> str:
    head = (f"{'model':<9} {'metric':<22} {'weights pllm/llama.cpp':<23} {'pllm':>9} {'llama.cpp':>10} "
            f"{'ratio':>7} {'target':>8} {'met':>4}")
    lines = [head, "-" * len(head)]
    for r in rows:
        def cell(v: float | None) -> str:
            return f"{v:>9.1f}" if v is not None else f"{'n/a':>9}"

        ratio = r.ratio
        met = "" if ratio is None or r.target is None else ("yes" if r.target.met(ratio) else "no")
        lines.append(
            f"{r.model:<9} {r.metric:<22} {r.pllm_weights + ' / ' + r.llama_weights:<23} {cell(r.pllm)} "
            f"{cell(r.llama):>10} {(f'{ratio:.2f}x' if ratio is not None else '-'):>7} "
            f"{(str(r.target) if r.target else '-'):>8} {met:>4}" + (f"  {r.note}" if r.note else "")
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def choices(allowed: tuple[str, ...]):
        def parse(text: str) -> list[str]:
            items = [t.strip() for t in text.split(",") if t.strip()]
            bad = [t for t in items if t not in allowed]
            if bad or not items:
                raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allowed)}")
            return items
        return parse

    def levels(text: str) -> list[int]:
        try:
            values = sorted({int(t) for t in text.split(",")})
        except ValueError:
            values = []
        if not values or values[0] < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers")
        return values

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pllm-llamacpp"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=choices(MODELS), default=["smollm2"], help="smollm2,llama1b (default smollm2)")
    p.add_argument("--rows", type=choices(ROWS), default=list(ROWS), help="decode,prefill,serve (default all)")
    p.add_argument("--precisions", type=choices(PRECISIONS), default=list(PRECISIONS),
                   help="decode rows' weights: bf16,int8,int4,int4g128,gguf-q8_0,gguf-q4_0 (default all)")
    p.add_argument("--concurrency", type=levels, default=[1, 4, 16], help="serving levels (default 1,4,16)")
    p.add_argument("--num-requests", type=int, default=32, help="requests per serving level (default 32)")
    p.add_argument("--input-len", type=int, default=128, help="serving prompt tokens (default 128)")
    p.add_argument("--output-len", type=int, default=128, help="serving output tokens (default 128)")
    p.add_argument("--threads", type=int, default=2, help="threads on both sides (default 2)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of decode and prefill on both sides")
    p.add_argument("--decode-steps", type=int, default=32, help="pllm decode steps per repetition")
    p.add_argument("--decode-depths", type=levels, default=[],
                   help="decode rows also after contexts of these many tokens, e.g. 2000 (default none)")
    p.add_argument("--huge-pages", action="store_true",
                   help="pllm with its weights in huge pages (huge_pages=True, pllm-serve --huge-pages); llama.cpp "
                        "maps its file either way")
    p.add_argument("--quick", action="store_true",
                   help="short runs: 1 repetition, 8 requests per level, 16 decode steps")
    p.add_argument("--cache", type=Path, default=cache, help=f"llama.cpp build and models (default {cache})")
    p.add_argument("--reuse-builds", action="store_true",
                   help="keep pllm's builds in --cache/work and reuse them (default: compile afresh each run)")
    p.add_argument("--llama-cpp-bin", default=None, help="a folder with llama-server, llama-bench, llama-quantize")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.num_requests, args.decode_steps = 1, 8, 16
    for name in ("num_requests", "input_len", "output_len", "threads", "reps", "decode_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated run still stops the servers it started
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # pllm-serve and pllm-compile children
    import torch

    torch.set_num_threads(args.threads)
    llama = llamacpp.find_or_build(args.cache, args.llama_cpp_bin)
    print(f"llama.cpp tools: {llama.bin_dir}; {os.cpu_count()} CPUs, {args.threads} threads each side", flush=True)
    work = args.cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for model in args.models:
        prepared = prepare_model(model, args, llama, work)
        rows += measure_model(model, prepared, args, llama, work)
        print("\n" + format_table(rows), flush=True)
    weights = "pllm's weights in huge pages" if args.huge_pages else "both sides' weights mapped from their files"
    print(f"\npllm / llama.cpp on this machine ({os.cpu_count()} CPUs, {args.threads} threads each; {weights}), "
          "one sitting")
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps([dict(asdict(r), ratio=r.ratio, target=str(r.target) if r.target else None)
                                         for r in rows], indent=1))
    return 0


def measure_model(model: str, prepared: Prepared, args, llama: llamacpp.LlamaCpp, work: Path) -> list[Row]:
    rows: list[Row] = []
    if "decode" in args.rows or "prefill" in args.rows:
        rows += in_process_rows(model, prepared, args, llama)
    if "serve" in args.rows:
        rows += serve_rows(model, prepared, args, llama, work)
    return rows


def in_process_rows(model: str, prepared: Prepared, args, llama: llamacpp.LlamaCpp) -> list[Row]:
    rows = []
    for precision in args.precisions:
        build, why_not = prepared.pllm_builds[precision]
        pllm_decode = pllm_prefill = None
        pllm_deep = dict.fromkeys(args.decode_depths, Measured(None, why_not))
        if build is not None:
            pllm_decode, pllm_prefill, pllm_deep = pllm_in_process(build, args)
        for lp in LLAMA_TYPES[precision]:  # measured beside each pllm row, so a file compared twice is timed twice
            gguf = prepared.ggufs[lp]
            label = llamacpp.QUANT_TYPES[lp].removesuffix("_M")
            if "decode" in args.rows:
                theirs = llama_rate(llama, gguf, args, 0, args.output_len)
                rows.append(Row(model, "decode b1 tok/s", precision, label, pllm_decode, theirs.value,
                                Target(Goal.AT_LEAST, 1.2), why_not or theirs.why_not))
            if "prefill" in args.rows:
                theirs = llama_rate(llama, gguf, args, PREFILL_TOKENS, 0)
                rows.append(Row(model, f"prefill {PREFILL_TOKENS} tok/s", precision, label, pllm_prefill,
                                theirs.value, None, why_not or theirs.why_not))
            for depth in args.decode_depths if "decode" in args.rows else ():
                theirs, ours = llama_rate(llama, gguf, args, 0, args.output_len, depth), pllm_deep[depth]
                rows.append(Row(model, f"decode b1 @{depth} tok/s", precision, label, ours.value, theirs.value,
                                Target(Goal.AT_LEAST, 1.2), ours.why_not or theirs.why_not))
    return rows


def llama_rate(llama: llamacpp.LlamaCpp, gguf: Path, args, prompt: int, gen: int, depth: int = 0) -> Measured:
    """llama-bench's tok/s for one test (a prompt of `prompt` tokens, or `gen` generated), or why there is none: a
    llama-bench that fails (e.g. killed by an illegal instruction: its prompt processing of Q8_0 and Q4_0 did so on a
    Sapphire Rapids VM) spoils only its own rows."""
    try:
        (result,) = llamacpp.llama_bench(llama, gguf, args.threads, prompt, gen, args.reps, depth)
    except llamacpp.LlamaCppError as e:
        return Measured(None, f"llama.cpp: {str(e).splitlines()[0][:160]}")
    return Measured(result.tokens_per_s)


def pllm_in_process(build: Path, args) -> tuple[float, float, dict[int, Measured]]:
    """(batch-1 decode tok/s, 512-token prefill tok/s, batch-1 decode tok/s after each of --decode-depths, or why
    not where the model has too few positions for it): medians over --reps."""
    from bench_dtype import prefill_seconds

    from pllm import LLM

    llm = LLM(str(build), backend="cpu", kv_cache_memory=1 << 28, max_num_batched_tokens=PREFILL_TOKENS,
              huge_pages=args.huge_pages)
    rng = random.Random(0)
    prefill_seconds(llm, rng)  # warm-up: packed weights, oneDNN primitives
    decode = decode_tok_s(llm, DECODE_CONTEXT, args)
    deep: dict[int, Measured] = {}
    for depth in args.decode_depths:
        try:
            deep[depth] = Measured(decode_tok_s(llm, depth, args))
        except ValueError as e:  # the model's positions end before the steps do
            deep[depth] = Measured(None, f"not available: {e}")
    prefill = [prefill_seconds(llm, rng) for _ in range(args.reps)]
    del llm
    gc.collect()
    return decode, PREFILL_TOKENS / statistics.median(prefill), deep


def decode_tok_s(llm, context: int, args) -> float:
    """Batch-1 decode tok/s after a `context`-token prompt: the median over --reps rounds of --decode-steps steps."""
    from bench_throughput import time_decode_steps

    steps, _ = time_decode_steps(llm, 1, context, {"pllm": lambda: None}, rounds=args.reps, steps=args.decode_steps)
    return 1.0 / statistics.median(steps["pllm"])


def serve_rows(model: str, prepared: Prepared, args, llama: llamacpp.LlamaCpp, work: Path) -> list[Row]:
    import bench_serve

    build, why_not = prepared.pllm_builds["bf16"]
    gguf = prepared.ggufs["bf16"]
    rng = random.Random(0)

    def fresh_prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(3, 256) for _ in range(args.input_len)] for _ in range(n)]

    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    stats: dict[str, dict[int, bench_serve.LevelStats]] = {"pllm": {}, "llama.cpp": {}}
    try:
        servers["llama.cpp"] = llamacpp.start_server(llama, gguf, args.threads, max(args.concurrency),
                                                     args.input_len + args.output_len + 64, work / "llama-server.log")
        if build is not None:
            servers["pllm"] = bench_serve.launch_server(
                str(build), ["--backend", "cpu", *(["--huge-pages"] if args.huge_pages else [])])
        clients = {name: SimpleNamespace(model=served_model(url), api_key=None, output_len=args.output_len,
                                         max_duration_s=600.0) for name, (_, url) in servers.items()}
        warm_up = fresh_prompts(2)
        for name, (_, url) in servers.items():  # warm-up, not reported
            asyncio.run(bench_serve.run_level(clients[name], f"{url}/v1/completions", warm_up, 1))
        for c in args.concurrency:
            # Fresh prompts at each level, the same for both servers: a prompt either server has seen would be a
            # prefix-cache hit (both keep finished prompts' K/V), and TTFT would then time one token, not a prefill.
            prompts = fresh_prompts(args.num_requests)
            for name, (_, url) in servers.items():  # the two servers take turns, level by level
                s = asyncio.run(bench_serve.run_level(clients[name], f"{url}/v1/completions", prompts, c))
                stats[name][c] = s
                print(f"  {model} {name} c={c}: {s.output_tokens_per_s:.1f} out tok/s, TTFT p50 "
                      f"{s.ttft_ms[0]:.0f} ms, {s.num_completed} done, {s.num_failed} failed", flush=True)
    finally:
        for proc, _ in servers.values():
            llamacpp.stop_server(proc)
    rows = []
    for c in args.concurrency:
        tput_target, ttft_target = serve_targets(c)
        p, q = stats["pllm"].get(c), stats["llama.cpp"][c]
        rows.append(Row(model, f"serve c{c} out tok/s", "bf16", "BF16", p.output_tokens_per_s if p else None,
                        q.output_tokens_per_s, tput_target, why_not))
        rows.append(Row(model, f"serve c{c} TTFT p50 ms", "bf16", "BF16", p.ttft_ms[0] if p else None,
                        q.ttft_ms[0], ttft_target, why_not))
    return rows


def served_model(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


if __name__ == "__main__":
    sys.exit(main())
