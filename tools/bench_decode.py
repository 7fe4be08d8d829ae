"""Decode step time by batch size on the cuda backend: steps replayed from CUDA graphs against eager steps.

    python tools/bench_decode.py build/ [--batch-sizes 1,8,32,128] [--prompt-len 128] [--json out.json]

For each batch size the same running batch takes turns between the captured graphs and eager steps (the runner's
graphs set aside), `--steps` steps at a time for `--rounds` rounds, so drift hits both alike. Prints the best and
median ms/step of each, tokens/s, the graphs' speed-up, and the weight-read floor: the model's weight bytes over the
device copy bandwidth measured in the same run (a decode step cannot be faster than reading every weight once).
A benchmark, not a test.

--backend interpret is a dry run on the CPU for a tiny build: the graphs' static buffers and padding, replayed
eagerly through the Triton interpreter. It checks this script's wiring without a GPU and times nothing useful.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_throughput import time_decode_steps

from pllm import LLM
from pllm.runtime.worker.cuda_graphs import default_capture_sizes, eager_capture


def copy_bandwidth(device: torch.device, num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of a large device copy (read + write counted): the ceiling for reading weights."""
    src = torch.empty(num_bytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build_dir")
    ap.add_argument("--backend", choices=["cuda", "interpret"], default="cuda")
    ap.add_argument("--batch-sizes", default="1,8,32,128", help="comma-separated decode batch sizes")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=None, help="default: the model's limit")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    llm = LLM(args.build_dir, backend=args.backend, max_num_seqs=max(batch_sizes), max_model_len=args.max_model_len)
    runner = llm.engine.runner
    if args.backend == "interpret":
        runner.decode_graphs = runner.capture_decode_graphs(default_capture_sizes(max(batch_sizes)), eager_capture)
    graphs = runner.decode_graphs
    if graphs is None:
        raise SystemExit("no CUDA graphs were captured (see the engine's warning above): nothing to compare")
    variants = {"CUDA graphs": lambda: setattr(runner, "decode_graphs", graphs),
                "eager": lambda: setattr(runner, "decode_graphs", None)}

    weight_bytes = sum(t.numel() * t.element_size() for t in runner.model.w.values())
    bandwidth = copy_bandwidth(runner.device) if args.backend == "cuda" else None
    floor_ms = weight_bytes / bandwidth * 1e3 if bandwidth else None
    print(f"{llm.engine.build.dtype} weights {weight_bytes / 2**20:.0f} MiB; graphs for batch sizes {graphs.sizes}")
    if bandwidth:
        print(f"device copy bandwidth {bandwidth / 1e9:.0f} GB/s: weight-read floor {floor_ms:.3f} ms/step")

    rows = []
    print(f"\n{'batch':>5} {'graphs ms':>10} {'(median)':>9} {'eager ms':>9} {'(median)':>9} {'speed-up':>8} "
          f"{'tok/s':>8} {'floor/step':>10}")
    for batch in batch_sizes:
        times, ctx = time_decode_steps(llm, batch, args.prompt_len, variants, args.rounds, args.steps)
        best = {name: min(ts) * 1e3 for name, ts in times.items()}
        median = {name: sorted(ts)[len(ts) // 2] * 1e3 for name, ts in times.items()}
        g, e = "CUDA graphs", "eager"
        row = {"batch": batch, "context": ctx, "graphs_ms": best[g], "graphs_median_ms": median[g],
               "eager_ms": best[e], "eager_median_ms": median[e], "speedup": best[e] / best[g],
               "tok_s": batch / best[g] * 1e3, "floor_fraction": floor_ms / best[g] if floor_ms else None}
        rows.append(row)
        floor = f"{100 * row['floor_fraction']:.0f}%" if floor_ms else "n/a"
        print(f"{batch:5d} {best[g]:10.3f} {median[g]:9.3f} {best[e]:9.3f} {median[e]:9.3f} {row['speedup']:7.2f}x "
              f"{row['tok_s']:8.0f} {floor:>10}")
    if args.json:
        Path(args.json).write_text(json.dumps({"backend": args.backend, "weight_bytes": weight_bytes,
                                               "copy_bandwidth": bandwidth, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
