"""Time the cpu mixture-of-experts path against a plain per-expert loop (transformers' own), in the same run.

usage: python tools/bench_moe.py [--shape mixtral-small|qwen3-moe-small|all] [--dtype float32|bfloat16]
                                 [--repeats 20]

Both sides get the same stacked expert weights and the same router choices (softmax top-k of random logits) at
1, 16 and 256 tokens. The baseline is transformers' MixtralExperts.forward written out: a one-hot mask over
(token, k, expert), then per hit expert a torch.where, a gather, two linears and an index_add_. The pllm path
(runtime/backends/cpu/cpu_moe.py) sorts the pairs by expert once and runs one gather, one pair of linears per
active expert and one index_add_. Each row prints the medians and baseline / pllm (above 1: pllm is faster), and
checks the two outputs agree. This machine is shared and noisy: only the ratios from one run hold.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from pllm.runtime.backends.cpu.cpu_moe import grouped_moe

SHAPES = {  # hidden, expert width, experts, top-k
    "mixtral-small": (512, 1792, 8, 2),  # Mixtral's 8 experts, top-2, at an eighth of its widths
    "qwen3-moe-small": (512, 192, 128, 8),  # Qwen3-30B-A3B's 128 narrow experts, top-8, at a quarter of its widths
}
TOKEN_COUNTS = (1, 16, 256)


def per_expert_loop(x, topk_weights, topk_ids, gate_up_weights, down_weights) -> torch.Tensor:
    """transformers' MixtralExperts.forward (5.x), on the same [E, 2I, H] / [E, H, I] tensors."""
    num_experts = gate_up_weights.shape[0]
    final = torch.zeros_like(x)
    with torch.no_grad():
        expert_mask = F.one_hot(topk_ids, num_classes=num_experts + 1).permute(2, 1, 0)  # [E + 1, K, T]
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        gate, up = F.linear(x[token_idx], gate_up_weights[expert_idx]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, down_weights[expert_idx])
        h = h * topk_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, h.to(final.dtype))
    return final


def median_seconds(fns: list, repeats: int) -> list[float]:
    """Median time of each fn; the fns take turns within every repeat, so load on a shared machine hits them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()  # warm-up
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            start = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, {args.dtype}")
    print(f"{'shape':<16} {'tokens':>6} {'loop ms':>9} {'pllm ms':>9} {'loop/pllm':>9}")
    gen = torch.Generator().manual_seed(0)
    for name in SHAPES if args.shape == "all" else [args.shape]:
        hidden, width, num_experts, top_k = SHAPES[name]
        gate_up = (torch.randn((num_experts, 2 * width, hidden), generator=gen) * hidden**-0.5).to(dtype)
        down = (torch.randn((num_experts, hidden, width), generator=gen) * width**-0.5).to(dtype)
        for num_tokens in TOKEN_COUNTS:
            x = torch.randn((num_tokens, hidden), generator=gen).to(dtype)
            probs = torch.softmax(torch.randn((num_tokens, num_experts), generator=gen), dim=-1)
            weights, ids = torch.topk(probs, top_k, dim=-1)
            weights = weights / weights.sum(dim=-1, keepdim=True)
            with torch.inference_mode():
                expected = per_expert_loop(x, weights, ids, gate_up, down)
                got = grouped_moe(x, weights, ids, gate_up, down)
                torch.testing.assert_close(got, expected)
                inputs = (x, weights, ids, gate_up, down)
                loop, ours = median_seconds([partial(per_expert_loop, *inputs), partial(grouped_moe, *inputs)],
                                            args.repeats)
            print(f"{name:<16} {num_tokens:>6} {loop * 1e3:>9.3f} {ours * 1e3:>9.3f} {loop / ours:>9.2f}")


if __name__ == "__main__":
    main()
