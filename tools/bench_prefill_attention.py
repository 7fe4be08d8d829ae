"""A prompt's attention on the cpu backend: the compiled kernel (cpu_prefill_attention) against the path without it
(K/V gathered from the paged cache, torch's SDPA per sequence), one layer, same inputs, same run.

    chrt -f 10 python tools/bench_prefill_attention.py [--shapes 64:9:3:512,64:9:3:2048,256:4:1:2048:512]
                                                       [--reps 5]

A shape is head_dim:heads:kv_heads:prompt_tokens[:window]. For each, the kernel is rendered and compiled for those
heads (bf16, blocks of 16), one prompt of that length fills a paged cache, and TorchOps.attention runs it with and
without the kernel, taking turns; prints the best of --reps each, the GFLOP/s of the causal (or windowed) products
and the kernel's speed-up. Needs a CPU with AVX-512 BF16 (the kernel runs nowhere else). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from pllm.compiler.cpu_compile import compile_cpu_kernels
from pllm.compiler.plan import make_plan
from pllm.compiler.render import render_plan
from pllm.models.ops import AttentionMetadata
from pllm.models.spec import ModelSpec
from pllm.runtime.backends.cpu.cpu_ops import TorchOps
from pllm.runtime.backends.cpu.cpu_prefill_attention import CpuPrefillAttention

BLOCK = 16


def spec(head_dim: int, heads: int, kv_heads: int) -> ModelSpec:
    return ModelSpec(model_type="llama", hidden_size=heads * head_dim, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=128,
                     rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=1 << 16,
                     tie_word_embeddings=False, attention_bias=False, torch_dtype="bfloat16", bos_token_id=1,
                     eos_token_ids=(2,))


def kernel_for(head_dim: int, heads: int, kv_heads: int, out_dir: Path) -> CpuPrefillAttention:
    plan = make_plan(spec(head_dim, heads, kv_heads), "bfloat16", BLOCK)
    alone = dataclasses.replace(plan, kernels=(plan.kernel("cpu_prefill_attention"),))  # that kernel alone
    render_plan(alone, out_dir)
    entry = compile_cpu_kernels(out_dir, alone)
    if "error" in entry:
        raise SystemExit(entry["error"])
    return CpuPrefillAttention(out_dir / entry["libraries"]["cpu_prefill_attention"], BLOCK, heads, kv_heads,
                               head_dim)


def one_prompt(length: int, heads: int, kv_heads: int, head_dim: int):
    """q [length, heads, head_dim], caches holding the prompt's K/V in shuffled blocks, and the step's metadata."""
    gen = torch.Generator().manual_seed(0)
    blocks = -(-length // BLOCK)
    k_cache = torch.randn((blocks, BLOCK, kv_heads, head_dim), generator=gen).to(torch.bfloat16)
    v_cache = torch.randn((blocks, BLOCK, kv_heads, head_dim), generator=gen).to(torch.bfloat16)
    table = torch.randperm(blocks, generator=gen).to(torch.int32)[None, :]
    positions = torch.arange(length)
    meta = AttentionMetadata(positions=positions, slot_mapping=torch.zeros_like(positions),
                             query_start_loc=torch.tensor([0, length], dtype=torch.int32),
                             seq_lens=torch.tensor([length], dtype=torch.int32), block_tables=table.contiguous(),
                             max_query_len=length, max_seq_len=length, query_lens_host=(length,),
                             seq_lens_host=(length,))
    q = torch.randn((length, heads, head_dim), generator=gen).to(torch.bfloat16)
    return q, k_cache, v_cache, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="64:9:3:512,64:9:3:2048,128:32:8:1024,256:4:1:512:512,256:4:1:2048:512")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(f"{torch.get_num_threads()} threads; best of {args.reps}; GFLOP/s of the causal (windowed) products")
    for shape in args.shapes.split(","):
        head_dim, heads, kv_heads, length, *rest = (int(n) for n in shape.split(":"))
        window = rest[0] if rest else None
        with tempfile.TemporaryDirectory() as tmp:
            kernel = kernel_for(head_dim, heads, kv_heads, Path(tmp))
            if not kernel.runs:
                raise SystemExit("the kernel does not run on this CPU (no AVX-512 BF16)")
            q, k_cache, v_cache, meta = one_prompt(length, heads, kv_heads, head_dim)
            paths = {"sdpa": TorchOps(), "kernel": TorchOps(prefill_attention=kernel)}
            best = {name: float("inf") for name in paths}
            for rep in range(args.reps + 1):  # the first round warms up
                for name, ops in paths.items():
                    t = time.perf_counter()
                    ops.attention(q, k_cache, v_cache, meta, head_dim**-0.5, window=window)
                    if rep:
                        best[name] = min(best[name], time.perf_counter() - t)
        seen = sum(min(i + 1, window or i + 1) for i in range(length))  # keys each query sees
        flops = 4 * heads * head_dim * seen  # q . k and p . v, a multiply and an add each
        line = ", ".join(f"{name} {s * 1e3:7.1f} ms ({flops / s / 1e9:5.0f} GFLOP/s)" for name, s in best.items())
        print(f"d {head_dim:3} heads {heads:2}/{kv_heads:<2} tokens {length:5} window {window or '-':>5}: {line}, "
              f"{best['sdpa'] / best['kernel']:.2f}x")


if __name__ == "__main__":
    main()
