"""tools/bench_vs_llamacpp.py's in-process rows: batch-1 decode and the 512-token prefill, pllm in this process and
llama.cpp's llama-bench taking turns repetition by repetition, and the read bandwidth sampled between them."""

from __future__ import annotations

import gc
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

import llamacpp
from bench_models import LLAMA_TYPES, Prepared
from step_bytes import gguf_step_bytes, pllm_step_bytes
from vs_rows import Goal, Measured, Row, Target

PREFILL_TOKENS = 512
DECODE_CONTEXT = 64


class ReadSamples:
    """The machine's read bandwidth, sampled between the in-process repetitions: the bar the decode rows' GB/s are
    set against, from the same minutes."""

    def __init__(self, work: Path):
        from bench_gemv_bandwidth import ReadBandwidth

        self.reader = ReadBandwidth(work)
        self.values: list[float] = []  # bytes/s

    def sample(self) -> float:
        self.values.append(self.reader.sample())
        return self.values[-1]

    def describe(self) -> str:
        if not self.values:
            return "not measured"
        return (f"{min(self.values) / 1e9:.1f}-{max(self.values) / 1e9:.1f} GB/s over the sitting "
                f"(median {statistics.median(self.values) / 1e9:.1f}, {len(self.values)} samples); each row's "
                "\"read GB/s\" the median of those between its own repetitions")


@dataclass(frozen=True)
class InProcessTest:
    """One in-process row: a decode at a context (llama-bench tg after -d `depth`) or the 512-token prefill (pp512)."""

    metric: str
    prompt: int  # llama-bench -p
    gen: int  # llama-bench -n
    depth: int  # llama-bench -d; pllm's prompt before the decode steps (DECODE_CONTEXT for the plain decode row)
    target: Target | None


def in_process_tests(args) -> list[InProcessTest]:
    tests = []
    if "decode" in args.rows:
        tests.append(InProcessTest("decode b1 tok/s", 0, args.output_len, 0, Target(Goal.AT_LEAST, 1.2)))
    if "prefill" in args.rows:
        tests.append(InProcessTest(f"prefill {PREFILL_TOKENS} tok/s", PREFILL_TOKENS, 0, 0, None))
    if "decode" in args.rows:
        tests += [InProcessTest(f"decode b1 @{d} tok/s", 0, args.output_len, d, Target(Goal.AT_LEAST, 1.2))
                  for d in args.decode_depths]
    return tests


class Samples:
    """A figure's repetitions, or why it has none (the first failure stops the rest)."""

    def __init__(self, why_not: str = ""):
        self.values: list[float] = []
        self.why_not = why_not

    def add(self, measure) -> None:
        if self.why_not:
            return
        got = measure()
        if got.value is None:
            self.why_not = got.why_not
        else:
            self.values.append(got.value)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values and not self.why_not else None


def in_process_rows(model: str, prepared: Prepared, args, llama: llamacpp.LlamaCpp,
                    memory: ReadSamples | None) -> list[Row]:
    """The decode and prefill rows, the two sides taking turns repetition by repetition (one pllm repetition, then one
    llama-bench run of each llama.cpp file it is compared with, --reps times): the VM's memory bandwidth drifts from
    minute to minute, and all of one side's repetitions before the other's let that drift decide the ratio."""
    rows = []
    tests = in_process_tests(args)
    for precision in args.precisions:
        build, why_not = prepared.pllm_builds[precision]
        ours = {t: Samples(why_not) for t in tests}
        theirs = {(t, lp): Samples() for t in tests for lp in LLAMA_TYPES[precision]}
        pllm = PllmInProcess(build, args) if build is not None else None
        read: list[float] = []  # bytes/s, sampled between this precision's repetitions
        try:
            for _ in range(args.reps):
                for t in tests:
                    if pllm is not None:
                        ours[t].add(lambda t=t, pllm=pllm: pllm.measure(t))
                    for lp in LLAMA_TYPES[precision]:
                        theirs[t, lp].add(lambda t=t, lp=lp: llama_rate(llama, prepared.ggufs[lp], args, t))
                if memory is not None:
                    read.append(memory.sample())
        finally:
            if pllm is not None:
                pllm.close()
        decodes = build is not None and any(not t.prompt for t in tests)
        our_bytes = pllm_step_bytes(build) if decodes else None
        for lp in LLAMA_TYPES[precision]:  # a file compared with two pllm builds is timed beside each
            label = llamacpp.QUANT_TYPES[lp].removesuffix("_M")
            their_bytes = gguf_step_bytes(prepared.ggufs[lp]) if our_bytes is not None else None
            for t in tests:
                mine, other = ours[t], theirs[t, lp]
                decode = not t.prompt and our_bytes is not None
                rows.append(Row(model, t.metric, precision, label, mine.median, other.median, t.target,
                                mine.why_not or other.why_not, our_bytes if decode else None,
                                their_bytes if decode else None,
                                statistics.median(read) if decode and read else None))
    return rows


def llama_rate(llama: llamacpp.LlamaCpp, gguf: Path, args, test: InProcessTest) -> Measured:
    """llama-bench's tok/s for one repetition of a test, or why there is none: a llama-bench that fails (e.g. killed by
    an illegal instruction: its prompt processing of Q8_0 and Q4_0 did so on a Sapphire Rapids VM) spoils only its own
    rows."""
    try:
        (result,) = llamacpp.llama_bench(llama, gguf, args.threads, test.prompt, test.gen, 1, test.depth)
    except llamacpp.LlamaCppError as e:
        return Measured(None, f"llama.cpp: {str(e).splitlines()[0][:160]}")
    return Measured(result.tokens_per_s)


class PllmInProcess:
    """A pllm build loaded in this process, measured one repetition at a time."""

    def __init__(self, build: Path, args):
        from bench_dtype import prefill_seconds

        from pllm import LLM

        self.args = args
        self.llm = LLM(str(build), backend="cpu", kv_cache_memory=1 << 28, max_num_batched_tokens=PREFILL_TOKENS,
                       huge_pages=args.huge_pages)
        self.rng = random.Random(0)
        prefill_seconds(self.llm, self.rng)  # warm-up: packed weights, oneDNN primitives

    def measure(self, test: InProcessTest) -> Measured:
        from bench_dtype import prefill_seconds
        from bench_throughput import time_decode_steps

        if test.prompt:
            return Measured(PREFILL_TOKENS / prefill_seconds(self.llm, self.rng))
        try:  # fresh requests each repetition, so every one decodes at the same contexts
            steps, _ = time_decode_steps(self.llm, 1, test.depth or DECODE_CONTEXT, {"pllm": lambda: None},
                                         rounds=1, steps=self.args.decode_steps)
        except ValueError as e:  # the model's positions end before the steps do
            return Measured(None, f"not available: {e}")
        return Measured(1.0 / steps["pllm"][0])

    def close(self) -> None:
        del self.llm
        gc.collect()
