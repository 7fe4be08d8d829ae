"""pllm against llama.cpp on this machine, in one sitting: batch-1 decode, prefill and serving, side by side.

    python tools/bench_vs_llamacpp.py [--models smollm2,llama1b] [--rows decode,prefill,serve]
                                      [--precisions bf16,int8,int4,int4g128,int4_sym,gguf-q8_0,gguf-q4_0]
                                      [--serve-precisions bf16,int8,int4] [--concurrency 1,4,16]
                                      [--decode-depths 2000] [--quick]

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
  int8|int4|int4_sym [--quant-group-size 128]`; where pllm-compile refuses that flag, the rows say "not available".
  gguf-q8_0 and gguf-q4_0: pllm compiles llama.cpp's own Q8_0 / Q4_0 file with `--quantization gguf`, keeping its
  blocks, so both sides read the same layer bytes. The LM head too where it is Q8_0 (SmolLM2's tied one). Where the
  compared llama.cpp file's output matrix is Q6_K (llama-quantize's choice for an untied output in its 4-bit types:
  the 1.17B model's Q4_0 and Q4_K files), pllm's build of that row takes `--lm-head int6` (6.5 bits a weight against
  6.56; tools/bench_models.py's HEAD_FLAGS), else its default int8 head.
  With --decode-depths, the decode rows also at those contexts: pllm's steps with that long a prompt before them,
  llama-bench tg after -d that many tokens (a chat's history: the attention then reads its K and V every token).
- prefill: tok/s of a 512-token prompt, at each precision as decode; pllm one 512-token prefill in-process,
  llama-bench pp512.
- serve: tools/bench_serve.py's streaming client against pllm-serve and llama-server (bf16 builds; with
  --serve-precisions also others, each against the first llama.cpp file of its decode rows), the same random
  token-id prompts (fresh at each level, so neither server's prefix cache holds them), greedy, ignore_eos,
  --output-len tokens; the two servers take turns level by level. Then each server's resident memory (VmRSS, after
  its last level; tools/bench_memory.py reads it), a row without a target.
Decode rows also print as rates of memory (vs_rows.format_bytes_table): the weight bytes a token reads on each
side (tools/step_bytes.py), the GB/s of each side's tok/s, and their share of the read bandwidth, measured between
the repetitions (tools/stream_read.cpp over 1 GiB, as tools/bench_gemv_bandwidth.py): where both sides stream from
memory, the ratio at the same precision is held near the ratio of their bytes.
Decode and prefill figures are medians of --reps repetitions, the two sides taking turns repetition by repetition
(pllm in this process, then llama-bench -r 1), so the machine's drift hits both alike.
Ratios are pllm / llama.cpp; the targets of issue 15 print beside them. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import llamacpp
from bench_memory import Resident
from bench_models import LLAMA_TYPES, Prepared, prepare_model
from vs_in_process import ReadSamples, in_process_rows
from vs_rows import Row, format_bytes_table, format_table, serve_targets

MODELS = ("smollm2", "llama1b")
ROWS = ("decode", "prefill", "serve")
PRECISIONS = ("bf16", "int8", "int4", "int4g128", "int4_sym", "gguf-q8_0", "gguf-q4_0")


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
                   help="decode rows' weights: bf16,int8,int4,int4g128,int4_sym,gguf-q8_0,gguf-q4_0 (default all)")
    p.add_argument("--serve-precisions", type=choices(PRECISIONS), default=["bf16"],
                   help="serve rows' weights, each against the first llama.cpp file of its decode rows (int8: Q8_0, "
                        "int4: Q4_0; default bf16)")
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
                   help="keep pllm's builds in --cache/work and reuse those this pllm's compiler and kernel "
                        "templates made (default: compile afresh each run)")
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
    memory = ReadSamples(work) if "decode" in args.rows else None
    for model in args.models:
        prepared = prepare_model(model, args, llama, work)
        rows += measure_model(model, prepared, args, llama, work, memory)
        print("\n" + format_table(rows), flush=True)
    weights = "pllm's weights in huge pages" if args.huge_pages else "both sides' weights mapped from their files"
    print(f"\npllm / llama.cpp on this machine ({os.cpu_count()} CPUs, {args.threads} threads each; {weights}), "
          "one sitting")
    print(format_table(rows))
    if memory is not None:
        print(f"\ndecode rows as rates of memory; read bandwidth {memory.describe()}")
        print(format_bytes_table(rows))
    if args.json:
        args.json.write_text(json.dumps([dict(asdict(r), ratio=r.ratio, target=str(r.target) if r.target else None)
                                         for r in rows], indent=1))
    return 0


def measure_model(model: str, prepared: Prepared, args, llama: llamacpp.LlamaCpp, work: Path,
                  memory: ReadSamples | None) -> list[Row]:
    rows: list[Row] = []
    if "decode" in args.rows or "prefill" in args.rows:
        rows += in_process_rows(model, prepared, args, llama, memory)
    if "serve" in args.rows:
        rows += serve_rows(model, prepared, args, llama, work)
    return rows


def serve_rows(model: str, prepared: Prepared, args, llama: llamacpp.LlamaCpp, work: Path) -> list[Row]:
    rng = random.Random(0)
    return [row for precision in args.serve_precisions
            for row in serve_precision(model, precision, prepared, args, llama, work, rng)]


def serve_precision(model: str, precision: str, prepared: Prepared, args, llama: llamacpp.LlamaCpp, work: Path,
                    rng: random.Random) -> list[Row]:
    """Both servers over one precision's weights (pllm's build, llama.cpp's first file of its decode rows), the
    levels in turn."""
    import bench_serve

    build, why_not = prepared.pllm_builds[precision]
    theirs = LLAMA_TYPES[precision][0]
    gguf, label = prepared.ggufs[theirs], llamacpp.QUANT_TYPES[theirs].removesuffix("_M")

    def fresh_prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(3, 256) for _ in range(args.input_len)] for _ in range(n)]

    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    stats: dict[str, dict[int, bench_serve.LevelStats]] = {"pllm": {}, "llama.cpp": {}}
    resident: dict[str, Resident | None] = {}  # each server's memory after its last level
    try:
        try:  # one that dies (e.g. of an illegal instruction in its warm-up) spoils only its own rows
            servers["llama.cpp"] = llamacpp.start_server(llama, gguf, args.threads, max(args.concurrency),
                                                         args.input_len + args.output_len + 64,
                                                         work / "llama-server.log")
        except llamacpp.LlamaCppError as e:
            why_not = why_not or f"llama.cpp: {str(e).splitlines()[0][:160]}"
            print(f"  {model} {precision}: {why_not}", flush=True)
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
                print(f"  {model} {precision} {name} c={c}: {s.output_tokens_per_s:.1f} out tok/s, TTFT p50 "
                      f"{s.ttft_ms[0]:.0f} ms, {s.num_completed} done, {s.num_failed} failed", flush=True)
        resident = {name: Resident.of_process(proc.pid) for name, (proc, _) in servers.items()}
    finally:
        for proc, _ in servers.values():
            llamacpp.stop_server(proc)
    rows = []
    for c in args.concurrency:
        tput_target, ttft_target = serve_targets(c)
        p, q = stats["pllm"].get(c), stats["llama.cpp"].get(c)
        rows.append(Row(model, f"serve c{c} out tok/s", precision, label, p.output_tokens_per_s if p else None,
                        q.output_tokens_per_s if q else None, tput_target, why_not))
        rows.append(Row(model, f"serve c{c} TTFT p50 ms", precision, label, p.ttft_ms[0] if p else None,
                        q.ttft_ms[0] if q else None, ttft_target, why_not))
    p, q = (resident.get(name) for name in ("pllm", "llama.cpp"))  # after the last level: no target
    rows.append(Row(model, "serve resident MiB", precision, label, p.total if p else None, q.total if q else None,
                    None, why_not))
    return rows


def served_model(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


if __name__ == "__main__":
    sys.exit(main())
