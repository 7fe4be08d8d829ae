"""Where a decode step's time goes: the model's layers (the compiled stack, where the build has one), the LM head, and
the engine's host work around them, piece by piece.

    chrt -f 10 python tools/bench_step_split.py build/ [--batch-sizes 1,8,16] [--prompt-len 64] [--json out.json]

For each batch size a running batch of decode-only steps is timed `--steps` steps at a time for `--rounds` rounds, every
piece wrapped with a clock: scheduling, the step's input tensors, the layers (the model's forward: the embedding, then
the compiled stack with the Python around its call, or the per-op layers), the LM head, sampling, the scheduler's
update and the output processing (detokenising); "engine, other" is what the step takes beyond them (its own
bookkeeping, the wrappers' own few microseconds). Prints the round with the
least total and the pieces' medians over rounds. A profile, not a comparison: nothing here is a speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from bench_throughput import decode_batch

PIECES = ("schedule", "inputs", "layers", "lm head", "sample", "update", "output")


class Clock:
    """Seconds spent in each wrapped callable since the last reset, by piece name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, piece: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[piece] += time.perf_counter() - t

        return timed


def instrument(engine, clock: Clock) -> None:
    """Wrap the step's pieces of this engine (its own objects; the sampling function in the engine's module)."""
    import pllm.runtime.engine.engine as engine_module

    runner, model = engine.runner, engine.runner.model
    engine.scheduler.schedule = clock.wrap("schedule", engine.scheduler.schedule)
    engine.scheduler.update = clock.wrap("update", engine.scheduler.update)
    runner.prepare = clock.wrap("inputs", runner.prepare)
    model.forward = clock.wrap("layers", model.forward)
    model.logits = clock.wrap("lm head", model.logits)
    engine.processor.process = clock.wrap("output", engine.processor.process)
    engine_module.sample_step = clock.wrap("sample", engine_module.sample_step)


def split(llm, clock: Clock, batch: int, prompt_len: int, steps: int, rounds: int) -> dict:
    """{"total": [ms per step per round], piece: [...]} for decode-only steps of `batch` sequences."""
    out: dict[str, list[float]] = {name: [] for name in ("total", *PIECES, "engine, other")}
    with decode_batch(llm, batch, prompt_len, rounds * steps + 8) as engine:
        engine.step()  # warm-up
        for _ in range(rounds):
            clock.seconds.clear()
            t = time.perf_counter()
            for _ in range(steps):
                engine.step()
            total = (time.perf_counter() - t) / steps * 1e3
            out["total"].append(total)
            for name in PIECES:
                out[name].append(clock.seconds[name] / steps * 1e3)
            out["engine, other"].append(total - sum(clock.seconds[name] for name in PIECES) / steps * 1e3)
    return out


def table(batch: int, ms: dict[str, list[float]]) -> str:
    best = min(range(len(ms["total"])), key=ms["total"].__getitem__)
    lines = [f"batch {batch}: {'piece':<14} {'best round ms':>13} {'share':>6} {'median ms':>10}"]
    for name, values in ms.items():
        share = values[best] / ms["total"][best]
        lines.append(f"{'':9}{name:<14} {values[best]:>13.3f} {share:>6.1%} {statistics.median(values):>10.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("build", type=Path)
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=16, help="steps per round")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--kv-cache-memory", type=int, default=1 << 28, help="bytes (default 256 MiB)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if min(batches) < 1 or min(args.steps, args.rounds, args.prompt_len) < 1:
        p.error("batch sizes, --steps, --rounds and --prompt-len must be at least 1")

    from pllm import LLM

    llm = LLM(str(args.build), kv_cache_memory=args.kv_cache_memory)
    clock = Clock()
    instrument(llm.engine, clock)
    layers = "compiled stack" if getattr(llm.engine.runner.model, "decode_stack", None) is not None else "per-op"
    print(f"{args.build}: layers {layers}; {args.steps} steps x {args.rounds} rounds, {args.prompt_len}-token prompts")
    results = {}
    for batch in batches:
        results[batch] = split(llm, clock, batch, args.prompt_len, args.steps, args.rounds)
        print(table(batch, results[batch]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"build": str(args.build), "layers": layers, "batches": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
