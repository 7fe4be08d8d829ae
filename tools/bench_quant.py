"""Packed-weight linear (cpu_quant_linear) against the bf16 path, and the machine's read bandwidth, in one run.

    python tools/bench_quant.py [--model smollm2|1b] [--tokens 1,2,4,8,16,32,64] [--rounds 5] [--routes]

A decoder layer's four matrices (fused qkv, o, gate_up, down) of the chosen shape, as many distinct layers as make
the bf16 copy exceed 256 MB (so no variant runs out of cache), in these forms: bf16 through the cpu backend's float
linear (TorchOps.linear: oneDNN's packed bf16 GEMM), INT8 per channel and INT4 at the default group (32) through
the compiled kernel's packed rows (`kernel.gemv`: the integer rows on x86-64). With --routes, also each packed
weight's other routes, to choose between them: the float rows (the kernel's fp32 code, which x86-64 CPUs ran
before the integer rows, `limit_isa(QuantRows.FLOAT_AVX512)`) and dequantise-then-GEMM (the prefill path: the
compiled dequantiser to bf16, into a buffer kept per shape as the cpu backend does, and oneDNN's GEMM). Each
round times every variant in turn (alternating, so drift on a shared machine hits all alike) over all layers; the
read bandwidth is a streaming fp32 sum over a 1 GB buffer, timed in the same rounds. Prints the median us per
layer, the effective GB/s of weight bytes streamed, the ratio to bf16 and to the bandwidth. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from pllm.compiler.cpu_compile import compile_cpu_kernels
from pllm.compiler.plan import make_plan
from pllm.compiler.quantize import INT4_DEFAULT_GROUP, quantize_int4, quantize_int8
from pllm.compiler.render import render_plan
from pllm.models.quant import QuantFormat, QuantizedWeight, QuantScheme
from pllm.models.spec import ModelSpec
from pllm.runtime.backends.cpu.cpu_ops import TorchOps
from pllm.runtime.backends.cpu.cpu_quant_linear import CpuQuantLinear, QuantRows

# (hidden, intermediate, q_size, kv_size): SmolLM2-135M and a TinyLlama-shaped 1.1B
SHAPES = {"smollm2": (576, 1536, 576, 192), "1b": (2048, 5632, 2048, 256)}
MIN_BF16_BYTES = 256 << 20
BANDWIDTH_BYTES = 1 << 30


def layer_shapes(model: str) -> list[tuple[int, int]]:
    h, inter, q, kv = SHAPES[model]
    return [(q + 2 * kv, h), (h, q), (2 * inter, h), (h, inter)]


def weight_bytes(w: torch.Tensor | QuantizedWeight) -> int:
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return sum(t.numel() * t.element_size() for t in (w.codes, w.scales, w.mins) if t is not None)


def compile_kernel(tmp: Path) -> CpuQuantLinear:
    spec = ModelSpec(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=1, num_key_value_heads=1, head_dim=64, vocab_size=128, rms_norm_eps=1e-5,
                     rope_theta=1e4, rope_scaling=None, max_position_embeddings=128, tie_word_embeddings=False,
                     attention_bias=False, torch_dtype="bfloat16", bos_token_id=None, eos_token_ids=())
    plan = make_plan(spec, "bfloat16", 16, quant=QuantFormat(QuantScheme.INT4, 64))
    plan = type(plan)(plan.dtype, plan.block_size, (plan.kernel("cpu_quant_linear"),), plan.quant)
    render_plan(plan, tmp)
    entry = compile_cpu_kernels(tmp, plan)
    assert "error" not in entry, entry
    return CpuQuantLinear(tmp / entry["libraries"]["cpu_quant_linear"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64", help="comma-separated token counts per call")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--routes", action="store_true", help="also time the float rows and dequantise-then-GEMM")
    args = ap.parse_args()
    shapes = layer_shapes(args.model)
    per_layer = sum(2 * n * k for n, k in shapes)
    num_layers = max(1, -(-MIN_BF16_BYTES // per_layer))
    gen = torch.Generator().manual_seed(0)
    bf16 = [[(torch.randn((n, k), generator=gen) * 0.02).bfloat16() for n, k in shapes] for _ in range(num_layers)]
    packed = {
        "int8": [[quantize_int8(w.float()) for w in layer] for layer in bf16],
        f"int4 g{INT4_DEFAULT_GROUP}": [[quantize_int4(w.float(), INT4_DEFAULT_GROUP) for w in layer]
                                        for layer in bf16],
    }
    with tempfile.TemporaryDirectory(prefix="pllm-bench-quant-") as tmp:
        kernel = compile_kernel(Path(tmp))
        ops = TorchOps(quant_kernel=kernel)

        def rows(isa: QuantRows) -> Callable:
            def run(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
                kernel.limit_isa(isa)
                return kernel.gemv(x, w, None)
            return run

        buffers: dict[tuple, torch.Tensor] = {}  # as the cpu backend's prefill path: one per shape, reused

        def dequantise_then_gemm(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
            out = buffers.setdefault((*w.shape, x.dtype), torch.empty(w.shape, dtype=x.dtype))
            return F.linear(x, kernel.dequantize(w, x.dtype, out=out))

        # name -> (layers, how one linear runs)
        variants: dict[str, tuple[list, Callable]] = {"bf16": (bf16, ops.linear)}
        for name, layers in packed.items():
            variants[name] = (layers, rows(QuantRows.INT_VNNI))
            if args.routes:
                variants[f"{name} float rows"] = (layers, rows(QuantRows.FLOAT_AVX512))
                variants[f"{name} deq+GEMM"] = (layers, dequantise_then_gemm)
        stream = torch.ones(BANDWIDTH_BYTES // 4)
        token_counts = [int(t) for t in args.tokens.split(",")]
        xs = {t: {k: torch.randn((t, k), generator=gen).bfloat16() for k in {k for _, k in shapes}}
              for t in token_counts}
        times: dict[tuple[str, int], list[float]] = {}
        bandwidth: list[float] = []
        for layers, run in variants.values():  # warm-up: oneDNN packs the bf16 weights on first use
            for layer in layers:
                for w in layer:
                    run(xs[token_counts[0]][w.shape[1]], w)
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            stream.sum()
            bandwidth.append(BANDWIDTH_BYTES / (time.perf_counter() - t0) / 1e9)
            for t in token_counts:
                for name, (layers, run) in variants.items():
                    t0 = time.perf_counter()
                    for layer in layers:
                        for w in layer:
                            run(xs[t][w.shape[1]], w)
                    times.setdefault((name, t), []).append((time.perf_counter() - t0) / num_layers)
        kernel.limit_isa(QuantRows.INT_VNNI)
    gbs = statistics.median(bandwidth)
    print(f"model shape {args.model}: {num_layers} distinct layers, {torch.get_num_threads()} threads; "
          f"read bandwidth (fp32 sum of 1 GB): {gbs:.1f} GB/s")
    print(f"{'tokens':>6} {'weights':<20} {'MB/layer':>8} {'us/layer':>9} {'GB/s':>6} {'vs bf16':>8} {'of bw':>6}")
    for t in token_counts:
        base = statistics.median(times["bf16", t])
        for name, (layers, _) in variants.items():
            med = statistics.median(times[name, t])
            size = sum(weight_bytes(w) for w in layers[0])
            print(f"{t:>6} {name:<20} {size / 1e6:>8.2f} {med * 1e6:>9.0f} {size / med / 1e9:>6.1f} "
                  f"{base / med:>7.2f}x {size / med / 1e9 / gbs:>5.0%}")


if __name__ == "__main__":
    main()
