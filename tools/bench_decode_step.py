"""Decode step time on the cpu backend: the compiled whole-stack step (cpu_decode_step) against the per-op path.

    chrt -f 10 python tools/bench_decode_step.py build/ [--batch-sizes 1,4,8,16] [--prompt-len 64] [--json out.json]
                                                 [--against-isa avx512]

For each batch size one running batch takes turns between the compiled step and the per-op forward (the same
engine, the model's decode stack switched off and on), `--steps` engine steps at a time for `--rounds` rounds, so
drift on a shared machine hits both alike. Prints the best and median ms/step of each and the speed-up. With
`--against-isa avx512` (or baseline, generic) a third variant takes the same turns: the compiled step with its GEMV
limited to that code (CpuDecodeStep.limit_isa), to weigh the best code against it in one run (AMX tiles against
the AVX-512 rows on a CPU with both).

Then the GEMVs alone: the step's GEMV (kernels/cpu_decode_step.so) over every layer's weight matrices, as GB/s
of weights read, against the machine's read bandwidth measured in the same run (a sum over a buffer far larger
than the caches, on torch's threads), and the whole step's weight bytes per step time. A build with packed weights
(pllm-compile --quantization) runs the same comparison, both sides reading the weights packed; its weight bytes
are the codes, scales and mins, and the float GEMV alone is not measured ("-"). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_throughput import time_decode_steps

from pllm import LLM
from pllm.models.quant import QuantizedWeight
from pllm.runtime.backends.cpu.cpu_decode_step import GemvIsa


def read_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of summing a buffer far larger than the caches: what streaming weights can reach."""
    buf = torch.ones(num_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats + 1):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return num_bytes / best


def gemv_bandwidth(step, weights: list[torch.Tensor], batch: int, repeats: int = 5) -> float:
    """Bytes/s of weights the step's GEMV reads, over the given matrices in turn (best of `repeats` passes)."""
    xs = [torch.randn((batch, w.shape[1])).to(w.dtype) for w in weights]
    total = sum(w.numel() * w.element_size() for w in weights)
    best = float("inf")
    for _ in range(repeats + 1):
        t = time.perf_counter()
        for w, x in zip(weights, xs, strict=True):
            step.gemv(w, x)
        best = min(best, time.perf_counter() - t)
    return total / best


def stored_bytes(w: torch.Tensor | QuantizedWeight) -> int:
    """Bytes a step reads of one weight: the tensor, or a packed weight's codes, scales and mins."""
    parts = (w.codes, w.scales, w.mins) if isinstance(w, QuantizedWeight) else (w,)
    return sum(t.numel() * t.element_size() for t in parts if t is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build_dir")
    ap.add_argument("--batch-sizes", default="1,4,8,16", help="comma-separated decode batch sizes")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--compiled-up-to", type=int,
                    help="run the compiled step up to this batch (default: the runtime's routing limit for the "
                         "build; at most the kernel's own limit, 64), to see where the per-op path wins")
    ap.add_argument("--against-isa", choices=[level.name.lower() for level in GemvIsa if level != GemvIsa.BEST],
                    help="also time the compiled step with its GEMV limited to this code (avx512: the AVX-512 rows "
                         "on a CPU whose best is AMX tiles), taking turns with the others; prints its time and the "
                         "best code's speed-up over it")
    args = ap.parse_args()

    llm = LLM(args.build_dir, backend="cpu", max_num_seqs=max(int(b) for b in args.batch_sizes.split(",")))
    runner = llm.engine.runner
    model, ops = runner.model, runner.ops
    stack = model.decode_stack
    if stack is None:
        raise SystemExit(f"{args.build_dir}: no compiled decode step for this build (see the start-up log)")
    if args.compiled_up_to is not None:  # what CompiledDecodeStack.accepts reads
        if not 1 <= args.compiled_up_to <= stack.kernel.kernel_max_batch:
            raise SystemExit(f"--compiled-up-to {args.compiled_up_to}: this build's step takes 1 to "
                             f"{stack.kernel.kernel_max_batch} sequences")
        stack.max_batch = args.compiled_up_to
    def variant(compiled: bool, level: GemvIsa = GemvIsa.BEST) -> Callable[[], None]:
        def use() -> None:
            model.decode_stack = stack if compiled else None
            # the LM head's GEMV too, in every variant, and its routing: as many rows as on a CPU whose best is that
            ops.decode_step.limit_isa(level)
        return use

    variants = {"compiled": variant(True), "per-op": variant(False)}
    against = GemvIsa[args.against_isa.upper()] if args.against_isa else None
    if against is not None:
        variants[f"compiled {args.against_isa}"] = variant(True, against)
    spec = runner.spec
    # every layer's matrices, in step order: together far larger than the caches, as a step streams them
    layer_weights = [w for layer in model.layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    weight_bytes = sum(stored_bytes(w) for w in layer_weights)
    kinds = ", ".join(f"{n} {label}" for label, n in sorted(stack.kinds.items()))
    print(f"{spec.model_type} {runner.dtype} {spec.num_hidden_layers} layers, {weight_bytes / 2**20:.0f} MiB of layer "
          f"weights ({kinds}); {torch.get_num_threads()} threads; GEMV: {ops.decode_step.isa}; compiled up to batch "
          f"{stack.max_batch}")
    float_weights = not stack.packed  # the step's float GEMV alone reads float weights only

    results: dict = {"threads": torch.get_num_threads(), "isa": ops.decode_step.isa, "linears": dict(stack.kinds),
                     "batches": {}}
    read = read_bandwidth()
    results["read_GBps"] = read / 1e9
    print(f"machine read bandwidth (sum of 1 GiB): {read / 1e9:.1f} GB/s")
    print(f"{'batch':>5} {'compiled ms':>12} {'per-op ms':>10} {'speed-up':>9} {'step GB/s':>10} {'GEMV GB/s':>10} "
          f"{'GEMV/read':>9}")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        times, _ = time_decode_steps(llm, batch, args.prompt_len, variants, args.rounds, args.steps)
        ops.decode_step.limit_isa(GemvIsa.BEST)  # the GEMV alone below runs the best code
        best = {name: min(ts) for name, ts in times.items()}
        median = {name: statistics.median(ts) for name, ts in times.items()}
        gemv = gemv_bandwidth(ops.decode_step, layer_weights, batch) if float_weights else None
        step_bw = weight_bytes / best["compiled"]
        row = {"best_ms": {k: v * 1e3 for k, v in best.items()},
               "median_ms": {k: v * 1e3 for k, v in median.items()},
               "speedup_best": best["per-op"] / best["compiled"],
               "speedup_median": median["per-op"] / median["compiled"],
               "step_weight_GBps": step_bw / 1e9, "gemv_GBps": gemv and gemv / 1e9,
               "gemv_over_read": gemv and gemv / read}
        results["batches"][batch] = row
        gemv_cells = f"{gemv / 1e9:>10.1f} {gemv / read:>9.2f}" if gemv else f"{'-':>10} {'-':>9}"
        print(f"{batch:>5} {best['compiled'] * 1e3:>12.2f} {best['per-op'] * 1e3:>10.2f} "
              f"{row['speedup_best']:>8.2f}x {step_bw / 1e9:>10.1f} {gemv_cells}")
        print(f"{'':>5} median {median['compiled'] * 1e3:>5.2f} {median['per-op'] * 1e3:>10.2f} "
              f"{row['speedup_median']:>8.2f}x")
        if against is not None:
            other = f"compiled {args.against_isa}"
            row["against_isa"] = {"isa": args.against_isa, "best_ms": best[other] * 1e3,
                                  "median_ms": median[other] * 1e3}
            print(f"{'':>5} compiled with the {args.against_isa} GEMV: {best[other] * 1e3:.2f} ms (median "
                  f"{median[other] * 1e3:.2f}); {results['isa']} {best[other] / best['compiled']:.2f}x faster "
                  f"(median {median[other] / median['compiled']:.2f}x)")
    model.decode_stack = stack
    ops.decode_step.limit_isa(GemvIsa.BEST)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
