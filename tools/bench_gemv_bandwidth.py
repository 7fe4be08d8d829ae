"""Batched matmuls of decode on the cpu backend: how fast they stream weights, against this machine's read bandwidth.

    chrt -f 10 python tools/bench_gemv_bandwidth.py [--dtypes bfloat16,float32] [--batches 1,2,4,8,16,32,64]
                                                    [--models smollm2-135m,llama-1b] [--tiles 4x4p2s16,4x4p2s0]
                                                    [--isa best,avx512,baseline,generic]

For each linear of SmolLM2-135M (qkv 576->960, o 576->576, gate_up 576->3072, down 1536->576, and the LM head
576->49152) and of a 1B llama (TinyLlama's shapes: hidden 2048, intermediate 5632, 32 heads, 4 KV heads, vocabulary
32000) and each batch size, the weight matrix is
copied until the copies fill >= --stream-mib (far past the 32 MiB L3), and one pass multiplies the same activations
by every copy in turn, as a decode step streams its layers' weights. Timed are:

  - the compiled step's GEMV (kernels/cpu_decode_step.so's pllm_gemv_many: the step's work-sharing loop over row
    tiles in one parallel region, so no call per matrix) for batches up to its MAX_BATCH, one column per --tiles
    variant (ROW_TILE x BATCH_TILE, pPREFETCH_TILES, sSEQUENTIAL_X_BYTES in KiB; the first is the engine's), and
    per --isa level (CpuDecodeStep.limit_isa: the best code the CPU has (bf16: AMX tiles from 3 rows where it has
    AMX-BF16), AVX-512, the x86-64 baseline's AVX2 tiles (both dtypes), the generic vector code); for bf16 where
    oneDNN packs in panels the step reads (runtime/backends/cpu/onednn.py), each variant again over oneDNN's packed
    copy of each matrix ("panels": the engine's path there, its rows then dropped);
  - the per-op path (TorchOps.linear: oneDNN on weights packed once for bf16, F.linear for fp32), one call each.

The engine runs the first up to compiled_batch_limit (runtime/backends/cpu/cpu_decode_step.py) and the second past
it; that column is starred. The variants take turns within each of --rounds rounds (best of rounds reported), so
drift on a shared machine hits them alike. Measured in the same run: the read bandwidth, the best of torch's sum over
a 1 GiB buffer and tools/stream_read.cpp's streaming read of it (1, 4 or 8 streams per thread, with and without
software prefetch), taken before every shape and the best kept, so a busy moment does not lower the bar; and the
matmul peak (a 2048^3 matmul in the dtype, best of 15). Each cell prints the weights' GB/s, its fraction of the read
bandwidth, and GFLOP/s as a fraction of the peak; a row is bandwidth-bound when the FLOP rate streaming at the read
bandwidth would need (2 * batch FLOP per weight) is under the peak.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import platform
import shlex
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_throughput import matmul_roofline

from pllm.compiler.cpu_compile import BASE_FLAGS, CPU_TARGETS, compile_cpu_kernels, find_compiler
from pllm.compiler.kernels import cpu_decode_step as step_kernel
from pllm.compiler.plan import make_plan
from pllm.compiler.render import render_plan
from pllm.models.spec import ModelSpec
from pllm.runtime.backends.cpu import onednn
from pllm.runtime.backends.cpu.cpu_decode_step import CpuDecodeStep, GemvIsa, compiled_batch_limit
from pllm.runtime.backends.cpu.cpu_ops import TorchOps

MODELS = {  # hidden, intermediate, heads, kv heads, head_dim
    "smollm2-135m": (576, 1536, 9, 3, 64),
    "llama-1b": (2048, 5632, 32, 4, 64),
}
VOCAB = {"smollm2-135m": 49152, "llama-1b": 32000}  # the LM head's rows


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One rendering of the step's GEMV: its tile shape, prefetch distance and row-at-a-time limit."""

    row_tile: int
    batch_tile: int
    prefetch_tiles: int
    sequential_kib: int  # SEQUENTIAL_X_BYTES / 1024: 0 reads every full tile's rows in step
    max_batch: int

    @classmethod
    def parse(cls, text: str, max_batch: int) -> Tiles:
        try:
            rows, rest = text.split("x", 1)
            batch, rest = rest.split("p")
            prefetch, _, sequential = rest.partition("s")
            kib = int(sequential) if sequential else step_kernel.SEQUENTIAL_X_BYTES // 1024
            return cls(int(rows), int(batch), int(prefetch), kib, max_batch)
        except ValueError:
            raise SystemExit(f"--tiles {text!r}: expected ROWxBATCHpPREFETCH[sKIB], e.g. 4x4p2s16") from None

    def __str__(self) -> str:
        return f"{self.row_tile}x{self.batch_tile}p{self.prefetch_tiles}s{self.sequential_kib}"


def make_spec(model: str) -> ModelSpec:
    hidden, intermediate, heads, kv_heads, head_dim = MODELS[model]
    return ModelSpec(model_type="llama", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=32000,
                     rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=2048,
                     tie_word_embeddings=False, attention_bias=False, torch_dtype="bfloat16", bos_token_id=1,
                     eos_token_ids=(2,))


def linear_shapes(model: str) -> dict[str, tuple[int, int]]:
    """name -> (out_features, in_features) of the layer's four weight matrices, as the runtime lays them out, and
    of the LM head."""
    hidden, intermediate, heads, kv_heads, head_dim = MODELS[model]
    q, kv = heads * head_dim, kv_heads * head_dim
    return {"qkv": (q + 2 * kv, hidden), "o": (hidden, q), "gate_up": (2 * intermediate, hidden),
            "down": (hidden, intermediate), "lm_head": (VOCAB[model], hidden)}


ISA_LEVELS = {level.name.lower(): level for level in GemvIsa}  # --isa's names


def compile_step(dtype: str, tiles: Tiles, out: Path, isa: str = "best") -> CpuDecodeStep:
    """The decode step rendered with these tiles (the GEMV takes any shape: SmolLM2's rendering serves all), its
    inner loop limited to the isa level (a library of its own per level: the choice is the library's)."""
    spec = make_spec("smollm2-135m")
    names = ("ROW_TILE", "BATCH_TILE", "PREFETCH_TILES", "SEQUENTIAL_X_BYTES", "MAX_BATCH")
    saved = {name: getattr(step_kernel, name) for name in names}
    step_kernel.ROW_TILE, step_kernel.BATCH_TILE = tiles.row_tile, tiles.batch_tile
    step_kernel.PREFETCH_TILES, step_kernel.MAX_BATCH = tiles.prefetch_tiles, tiles.max_batch
    step_kernel.SEQUENTIAL_X_BYTES = tiles.sequential_kib * 1024
    try:
        plan = make_plan(spec, dtype, 16)
        plan = dataclasses.replace(plan, kernels=(plan.kernel("cpu_decode_step"),))
        render_plan(plan, out)
        entry = compile_cpu_kernels(out, plan)
    finally:
        for name, value in saved.items():
            setattr(step_kernel, name, value)
    if "error" in entry:
        raise SystemExit(f"compiling the decode step ({tiles}): {entry['error']}")
    step = CpuDecodeStep(out / entry["libraries"]["cpu_decode_step"], spec, getattr(torch, dtype), 16)
    step.limit_isa(ISA_LEVELS[isa])
    return step


class ReadBandwidth:
    """The machine's read bandwidth: the best of a torch sum and tools/stream_read.cpp over one buffer far larger than
    the caches, re-measured on demand, the best seen kept."""

    CONFIGS = ((1, 0), (4, 0), (8, 0), (1, 4096), (4, 4096))  # (streams per thread, prefetch bytes ahead)

    def __init__(self, out: Path, num_bytes: int = 1 << 30):
        source = Path(__file__).with_name("stream_read.cpp")
        library = out / "stream_read.so"
        compiler = find_compiler()
        if compiler is None:
            raise SystemExit("no C++ compiler for tools/stream_read.cpp (set $CXX, or install g++)")
        arch = CPU_TARGETS.get(platform.machine(), ("", []))[1]  # the build's baseline instruction set
        subprocess.run([*shlex.split(compiler), *BASE_FLAGS, *arch, str(source), "-o", str(library)], check=True)
        self._read = ctypes.CDLL(str(library)).pllm_stream_read
        self._read.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int]
        self._read.restype = ctypes.c_float
        self.buf = torch.ones(num_bytes // 4, dtype=torch.float32)
        self.best: dict[str, float] = {}  # method -> best bytes/s

    def methods(self, buf: torch.Tensor) -> dict[str, Callable[[], object]]:
        out: dict[str, Callable[[], object]] = {"torch sum": buf.sum}
        for streams, prefetch in self.CONFIGS:
            out[f"stream x{streams} prefetch {prefetch}"] = lambda s=streams, p=prefetch: self._read(
                buf.data_ptr(), buf.numel(), s, p, torch.get_num_threads())
        return out

    def measure(self, repeats: int = 3) -> float:
        """The best read bandwidth seen so far (bytes/s), after a warm-up read by each method and `repeats` samples."""
        for fn in self.methods(self.buf).values():
            fn()
        for _ in range(repeats):
            self.sample()
        return self.bytes_per_s

    def sample(self) -> float:
        """The read bandwidth now (bytes/s): one read by each method, the best of them (each also kept in best)."""
        now = 0.0
        for name, fn in self.methods(self.buf).items():
            rate = self.buf.numel() * 4 / time_once(fn)
            self.best[name] = max(rate, self.best.get(name, 0.0))
            now = max(now, rate)
        return now

    def reader(self, num_bytes: int) -> Callable[[], object]:
        """The best method so far over the first num_bytes of the buffer: a read taking turns with the GEMVs."""
        method = max(self.best, key=self.best.__getitem__)
        return self.methods(self.buf[: num_bytes // 4])[method]

    @property
    def bytes_per_s(self) -> float:
        return max(self.best.values())


def time_once(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_shape(shape: tuple[int, int], dtype: torch.dtype, batches: list[int],
                steps: dict[str, tuple[CpuDecodeStep, int]], read: ReadBandwidth,
                stream_bytes: int, rounds: int) -> dict[int, dict[str, list[float]]]:
    """batch -> path -> seconds per pass over the copies, one per round."""
    out_f, in_f = shape
    one = torch.randn(shape) / in_f**0.5
    copies = [one.to(dtype, copy=True) for _ in range(max(1, -(-stream_bytes // (one.numel() * dtype.itemsize))))]
    ops = TorchOps()  # the per-op path's linear: packs bf16 weights once, as the engine's ops do
    # oneDNN's packed copies as panels, where this CPU packs bf16 in a layout the step reads (held apart from ops')
    packs = [onednn.pack(w) for w in copies] if dtype == torch.bfloat16 and onednn.panel_rows() is not None else []
    panels = [onednn.panels_of(w, p) for w, p in zip(copies, packs, strict=True)]
    panels = panels if panels and all(p is not None for p in panels) else []
    times: dict[int, dict[str, list[float]]] = {}
    for batch in batches:
        x = torch.randn((batch, in_f)).to(dtype)
        paths: dict[str, Callable[[], object]] = {}
        for name, (step, max_batch) in steps.items():
            if batch <= max_batch:
                paths[name] = step.gemv_stream(copies, x)
                if step.reads_panels and panels:  # the same GEMV code's choice over oneDNN's panels of each copy
                    assert all(step.panels_match(w, p) for w, p in zip(copies, panels, strict=True))
                    paths[f"{name} panels"] = step.gemv_stream(copies, x, panels)

        def per_op(x=x) -> None:
            for w in copies:
                ops.linear(x, w)

        paths["per-op"] = per_op
        copies_bytes = len(copies) * one.numel() * dtype.itemsize
        paths["read"] = read.reader(copies_bytes)  # the same bytes read plainly, in the same rounds
        for fn in paths.values():  # warm: oneDNN packs here, pages are touched
            fn()
        times[batch] = {name: [] for name in paths}
        for r in range(rounds):
            order = list(paths) if r % 2 == 0 else list(reversed(paths))  # alternate who goes first
            for name in order:
                times[batch][name].append(time_once(paths[name]))
    return times


def print_table(dtype_name: str, per_dtype: dict, names: list[str], batches: list[int]) -> None:
    """Each row's GB/s (fraction of the read bandwidth measured in the same rounds, of the peak) per path, the
    engine's path starred; then which batches meet 80% of the read bandwidth on the engine's path."""
    print(f"\n{dtype_name}: peak {per_dtype['peak_GFLOPs']:.0f} GFLOP/s (torch's 2048^3 matmul: "
          f"{per_dtype['matmul_GFLOPs']:.0f}), GEMV {per_dtype['isa']}; engine: compiled GEMV up to batch "
          f"{per_dtype['engine_limit']}, per-op past it; bandwidth-bound below batch {per_dtype['bound_batch']:.1f} "
          "(peak / best read bandwidth)")
    print(f"{'model':<13} {'linear':<8} {'batch':>5} {'read':>5}  "
          + "  ".join(f"{name + ' GB/s (read, peak)':>31}" for name in names))
    for row in per_dtype["rows"]:
        cells = []
        for name in names:
            cell = row["paths"].get(name)
            if cell is None:
                cells.append(f"{'-':>31}")
                continue
            star = "*" if name == row["engine_path"] else " "
            cells.append(f"{star}{cell['GBps']:6.1f} ({cell['of_read']:4.2f}, {cell['of_peak']:4.2f})".rjust(31))
        print(f"{row['model']:<13} {row['linear']:<8} {row['batch']:>5} {row['read_GBps']:5.1f}  " + "  ".join(cells))
    for batch in batches:
        fractions = [r["paths"][r["engine_path"]]["of_read"] for r in per_dtype["rows"] if r["batch"] == batch]
        if fractions:
            bound = "bandwidth-bound" if batch < per_dtype["bound_batch"] else "compute-bound"
            print(f"  batch {batch:>2} ({bound}): engine path at {min(fractions):.2f}-{max(fractions):.2f} of the "
                  f"read bandwidth, {sum(f >= 0.8 for f in fractions)}/{len(fractions)} linears >= 0.80")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--linears", default="qkv,o,gate_up,down,lm_head")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--tiles", default=None, help="comma-separated GEMV renderings to compare, ROWxBATCHpPREFETCH"
                    "[sKIB] (ROW_TILE, BATCH_TILE, PREFETCH_TILES, SEQUENTIAL_X_BYTES / 1024; default: the build's "
                    "own constants only, the first is the engine's)")
    ap.add_argument("--isa", default="best", help=f"comma-separated GEMV inner loops to compare, of "
                    f"{', '.join(ISA_LEVELS)} (limited to what this CPU runs; the first is the engine's)")
    ap.add_argument("--kernel-max-batch", type=int, default=step_kernel.MAX_BATCH,
                    help="render the step's GEMV for up to this batch (its MAX_BATCH)")
    ap.add_argument("--stream-mib", type=int, default=256, help="copies of each matrix fill at least this much")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    default = (f"{step_kernel.ROW_TILE}x{step_kernel.BATCH_TILE}p{step_kernel.PREFETCH_TILES}"
               f"s{step_kernel.SEQUENTIAL_X_BYTES // 1024}")
    tiles = [Tiles.parse(t, args.kernel_max_batch) for t in (args.tiles or default).split(",")]
    isas = args.isa.split(",")
    if unknown := sorted(set(isas) - set(ISA_LEVELS)):
        raise SystemExit(f"--isa {','.join(unknown)}: expected some of {', '.join(ISA_LEVELS)}")
    variants = [(t, isa) for t in tiles for isa in isas]  # the first is the engine's

    def variant_name(t: Tiles, isa: str) -> str:
        return f"gemv {t}" + (f" {isa}" if len(isas) > 1 else "")

    batches = [int(b) for b in args.batches.split(",")]
    results: dict = {"threads": torch.get_num_threads(), "dtypes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        read = ReadBandwidth(Path(tmp))
        print(f"{torch.get_num_threads()} threads; read bandwidth {read.measure() / 1e9:.1f} GB/s so far")
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            steps = {variant_name(t, isa): (compile_step(dtype_name, t, Path(tmp) / f"{dtype_name}-{t}-{isa}", isa),
                                            t.max_batch) for t, isa in variants}
            peak = max(matmul_roofline(dtype) for _ in range(3))  # best of 3 x 5: the busy VM lowers single runs
            per_dtype = results["dtypes"][dtype_name] = {
                "matmul_GFLOPs": peak / 1e9, "isa": ", ".join(step.isa for step, _ in steps.values()),
                "engine_limit": compiled_batch_limit(dtype, packed=False, floats=True,
                                                     amx=next(iter(steps.values()))[0].tiles_for_all()), "rows": []}
            for model in args.models.split(","):
                for linear in args.linears.split(","):
                    print(f"{dtype_name} {model} {linear}: read {read.measure() / 1e9:.1f} GB/s so far", flush=True)
                    shape = linear_shapes(model)[linear]
                    times = bench_shape(shape, dtype, batches, steps, read, args.stream_mib << 20, args.rounds)
                    nbytes = shape[0] * shape[1] * dtype.itemsize
                    copies_bytes = nbytes * max(1, -(-(args.stream_mib << 20) // nbytes))
                    for batch, per_path in times.items():
                        engine = variant_name(*variants[0]) if batch <= per_dtype["engine_limit"] else "per-op"
                        if f"{engine} panels" in per_path:  # the engine's step reads bf16 weights as panels here
                            engine = f"{engine} panels"
                        row = {"model": model, "linear": linear, "shape": list(shape), "batch": batch,
                               "engine_path": engine, "paths": {}}
                        row["read_GBps"] = copies_bytes / min(per_path.pop("read")) / 1e9
                        for name, ts in per_path.items():
                            best = min(ts)
                            flops = copies_bytes / dtype.itemsize * 2 * batch / best
                            row["paths"][name] = {"best_s": best, "median_s": statistics.median(ts),
                                                  "GBps": copies_bytes / best / 1e9, "GFLOPs": flops / 1e9,
                                                  "of_read": copies_bytes / best / 1e9 / row["read_GBps"]}
                        per_dtype["rows"].append(row)
        read.measure()
    results["read_GBps"] = read.bytes_per_s / 1e9
    results["read_by_method_GBps"] = {k: v / 1e9 for k, v in read.best.items()}
    print("\nread bandwidth, best of each method over the run (GB/s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in results["read_by_method_GBps"].items()))
    for dtype_name, per_dtype in results["dtypes"].items():
        dtype = getattr(torch, dtype_name)
        # the peak: torch's matmul, or a GEMV cell where it computed faster (fp32 GEMVs can outrun torch's matmul)
        cells = [cell for row in per_dtype["rows"] for cell in row["paths"].values()]
        per_dtype["peak_GFLOPs"] = max([per_dtype["matmul_GFLOPs"], *(cell["GFLOPs"] for cell in cells)])
        for cell in cells:
            cell["of_peak"] = cell["GFLOPs"] / per_dtype["peak_GFLOPs"]
        per_dtype["bound_batch"] = per_dtype["peak_GFLOPs"] * 1e9 * dtype.itemsize / (2 * read.bytes_per_s)
        for row in per_dtype["rows"]:
            row["bandwidth_bound"] = row["batch"] < per_dtype["bound_batch"]
        seen = {name for row in per_dtype["rows"] for name in row["paths"]}
        names = [name for t, isa in variants for name in (variant_name(t, isa), f"{variant_name(t, isa)} panels")]
        print_table(dtype_name, per_dtype, [*(name for name in names if name in seen), "per-op"], batches)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
