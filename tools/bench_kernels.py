"""Time each rendered kernel against its PyTorch baseline on this GPU, as a fraction of measured ceilings.

usage: python tools/bench_kernels.py [--shape smollm2|llama8b] [--dtype bfloat16] [--set all|float|quant]
                                    [--out bench_kernels]

Ceilings are measured here, in the same run: copy bandwidth (a large device-to-device copy) and matmul rate
(torch.matmul 8192^3 in the kernel dtype). Each case reports the Triton and baseline medians, their ratio, and
the Triton kernel's fraction of its roofline: max(bytes / bandwidth, flops / matmul rate) / measured time.
Baselines: scaled_dot_product_attention on dense K/V for attention (gathered from the paged cache before
timing, so the baseline is not charged for paging), eager PyTorch for the rest. The quantised matmuls
(quant_matmul_int8, quant_matmul_int4 with groups of 32, as GGUF's Q8_0 / Q4_1: --set quant) run the MLP's two
weights at decode and prefill sizes against F.linear on the same weights in the kernel dtype (cuBLAS), so the
speedup is what keeping weights packed buys over the float build's matmul. Writes <out>.json and
<out>.png. This machine is shared and noisy: only the ratios from one run hold (design.md, section 5).
--smoke runs every case once on the CPU under the Triton interpreter with tiny shapes and checks the Triton
result against the baseline (listing the cases checked in <out>.json): it proves this script's wiring without a GPU,
and times nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pllm.compiler.manifest import Language
from pllm.compiler.plan import BLOCK_SIZES, make_plan
from pllm.compiler.render import render_plan
from pllm.models.quant import QuantFormat, QuantizedWeight, QuantScheme, dequantize, pack_int4
from pllm.models.spec import ModelSpec
from pllm.runtime.backends.triton.triton_ops import TritonOps

SHAPES = {  # hidden, intermediate, heads, kv heads, head_dim
    "smollm2": (576, 1536, 9, 3, 64),
    "llama8b": (4096, 14336, 32, 8, 128),
    "tiny": (64, 128, 4, 2, 64),  # --smoke
}
# the packed formats timed, all in groups of 32: GGUF's Q8_0, Q4_1 (the default model's) and Q4_0 (INT4_SYM); INT6
# (a 6-bit LM head) runs INT8's kernel on the GPU, its codes a byte each, so it is not timed apart
QUANT_FORMATS = tuple(QuantFormat(scheme, 32) for scheme in (QuantScheme.INT8, QuantScheme.INT4, QuantScheme.INT4_SYM))
CASE_SETS = ("all", "float", "quant")


@dataclass(frozen=True)
class Case:
    kernel: str
    label: str  # e.g. "T=4096" or "B=8 L=4096"
    bytes: int  # what the kernel must move at least
    flops: int  # what it must compute
    triton_fn: Callable[[], object]
    baseline_fn: Callable[[], object]


@dataclass(frozen=True)
class Result:
    kernel: str
    label: str
    triton_ms: float
    baseline_ms: float
    speedup: float  # baseline / triton
    gb_per_s: float
    tflop_per_s: float
    roofline_fraction: float


def make_spec(name: str) -> ModelSpec:
    hidden, intermediate, heads, kv_heads, head_dim = SHAPES[name]
    return ModelSpec(model_type="llama", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=32000,
                     rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None, max_position_embeddings=131072,
                     tie_word_embeddings=False, attention_bias=False, torch_dtype="bfloat16", bos_token_id=1,
                     eos_token_ids=(2,))


def paged_cache(seq_lens: list[int], spec: ModelSpec, block_size: int, dtype: torch.dtype, device: str):
    """Caches with each sequence's blocks shuffled over the pool; returns caches, block tables, dense K/V."""
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq)
    shape = (num_blocks, block_size, spec.num_key_value_heads, spec.head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device=device)
    v_cache = torch.randn(shape, dtype=dtype, device=device)
    order = torch.randperm(num_blocks, device=device).to(torch.int32)
    block_tables = torch.zeros((len(seq_lens), max(blocks_per_seq)), dtype=torch.int32, device=device)
    start = 0
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = order[start : start + n]
        start += n
    # dense [B, KV, L, D] for the baseline: every sequence of a case has the same length
    dense_k = torch.stack([k_cache[block_tables[i, :n].long()].flatten(0, 1)[: seq_lens[i]]
                           for i, n in enumerate(blocks_per_seq)]).transpose(1, 2).contiguous()
    dense_v = torch.stack([v_cache[block_tables[i, :n].long()].flatten(0, 1)[: seq_lens[i]]
                           for i, n in enumerate(blocks_per_seq)]).transpose(1, 2).contiguous()
    return k_cache, v_cache, block_tables, dense_k, dense_v


def build_cases(ops: TritonOps, spec: ModelSpec, dtype: torch.dtype, block_size: int, device: str,
                smoke: bool) -> list[Case]:
    elem = torch.finfo(dtype).bits // 8
    hidden, inter = spec.hidden_size, spec.intermediate_size
    heads, kv_heads, head_dim = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
    scale = head_dim**-0.5
    randn = lambda *shape: torch.randn(shape, dtype=dtype, device=device)  # noqa: E731
    cases = []

    weight = randn(hidden)
    for t in ([3] if smoke else [1, 64, 4096]):
        x, res = randn(t, hidden), randn(t, hidden)

        def eager_rms(x=x, res=res):
            r = x + res
            r32 = r.float()
            return (r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + spec.rms_norm_eps)).to(dtype) * weight, r

        cases.append(Case("rms_norm", f"T={t}", 4 * t * hidden * elem + hidden * elem, 4 * t * hidden,
                          lambda x=x, res=res: ops.rms_norm(x, weight, spec.rms_norm_eps, res), eager_rms))

    max_pos = 8192 if not smoke else 64
    cos_sin = torch.randn((max_pos, head_dim), dtype=torch.float32, device=device)
    for t in ([5] if smoke else [64, 4096]):
        q, k, v = randn(t, heads, head_dim), randn(t, kv_heads, head_dim), randn(t, kv_heads, head_dim)
        positions = torch.randint(0, max_pos, (t,), device=device)
        num_blocks = math.ceil(t / block_size) + 1
        k_cache = randn(num_blocks, block_size, kv_heads, head_dim)
        v_cache = randn(num_blocks, block_size, kv_heads, head_dim)
        slots = torch.randperm(num_blocks * block_size, device=device)[:t]

        def eager_rope(q=q, k=k, v=v, positions=positions, k_cache=k_cache, v_cache=v_cache, slots=slots):
            half = head_dim // 2
            cos = cos_sin[positions, :half].repeat(1, 2)[:, None].to(dtype)
            sin = cos_sin[positions, half:].repeat(1, 2)[:, None].to(dtype)
            q_rot = q * cos + torch.cat([-q[..., half:], q[..., :half]], -1) * sin
            k_rot = k * cos + torch.cat([-k[..., half:], k[..., :half]], -1) * sin
            k_cache.view(-1, kv_heads, head_dim)[slots] = k_rot
            v_cache.view(-1, kv_heads, head_dim)[slots] = v
            return q_rot, k_rot

        moved = t * (heads + kv_heads) * head_dim * elem * 2 + 2 * t * kv_heads * head_dim * elem
        cases.append(Case("rope_kv_write", f"T={t}", moved, 6 * t * (heads + kv_heads) * head_dim,
                          lambda q=q, k=k, v=v, positions=positions, k_cache=k_cache, v_cache=v_cache, slots=slots:
                          ops.rope_kv_write(q, k, v, positions, cos_sin, k_cache, v_cache, slots), eager_rope))

    decode_kernel = ops.kernels["decode_attention"].decode_attention
    prefill_kernel = ops.kernels["prefill_attention"].prefill_attention
    # (64, 4096) on llama8b: the decode case (head_dim 128, 32 query heads over 8 KV heads)
    decode = [(2, 40)] if smoke else [(1, 4096), (8, 4096), (64, 1024), (64, 4096), (1, 32768)]
    for batch, context in decode:
        k_cache, v_cache, tables, dense_k, dense_v = paged_cache([context] * batch, spec, block_size, dtype, device)
        q = randn(batch, heads, head_dim)
        seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        moved = 2 * batch * context * kv_heads * head_dim * elem + 2 * batch * heads * head_dim * elem
        cases.append(Case(
            "decode_attention", f"B={batch} L={context}", moved, 4 * batch * heads * context * head_dim,
            lambda q=q, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens, tables=tables, context=context:
            decode_kernel(q, k_cache, v_cache, seq_lens, tables, scale, context),
            lambda q=q, dense_k=dense_k, dense_v=dense_v: F.scaled_dot_product_attention(
                q[:, :, None], dense_k, dense_v, scale=scale, enable_gqa=True)[:, :, 0],
        ))

    for t in ([20] if smoke else [512, 2048, 8192]):
        k_cache, v_cache, tables, dense_k, dense_v = paged_cache([t], spec, block_size, dtype, device)
        q = randn(t, heads, head_dim)
        starts = torch.tensor([0, t], dtype=torch.int32, device=device)
        seq_lens = torch.tensor([t], dtype=torch.int32, device=device)
        causal_flops = 2 * 2 * heads * head_dim * t * (t + 1) // 2
        moved = (2 * t * heads + 2 * t * kv_heads) * head_dim * elem
        cases.append(Case(
            "prefill_attention", f"T={t}", moved, causal_flops,
            lambda q=q, k_cache=k_cache, v_cache=v_cache, starts=starts, seq_lens=seq_lens, tables=tables, t=t:
            prefill_kernel(q, k_cache, v_cache, starts, seq_lens, tables, scale, t),
            lambda q=q, dense_k=dense_k, dense_v=dense_v: F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], dense_k, dense_v, scale=scale, is_causal=True, enable_gqa=True),
        ))

    gate_up, down = randn(2 * inter, hidden) * hidden**-0.5, randn(hidden, inter) * inter**-0.5
    for t in ([2, 20] if smoke else [1, 16, 256, 4096]):
        x = randn(t, hidden)

        def eager_mlp(x=x):
            g, u = F.linear(x, gate_up).chunk(2, dim=-1)
            return F.linear(F.silu(g) * u, down)

        moved = 3 * hidden * inter * elem + 2 * t * hidden * elem + 2 * t * inter * elem
        cases.append(Case("mlp", f"T={t}", moved, 6 * t * hidden * inter, lambda x=x: ops.mlp(x, gate_up, down),
                          eager_mlp))
    return cases


def random_quantized(fmt: QuantFormat, out_features: int, in_features: int, device: str) -> QuantizedWeight:
    """Codes over their whole range with scales that keep the product O(1), in fp16 as GGUF's Q8_0/Q4_0 keep theirs:
    timing does not care, the smoke check compares against the dequantised weight."""
    groups = in_features // fmt.group_size
    scales = (torch.rand((out_features, groups), device=device) * in_features**-0.5 / 16).half()
    if fmt.scheme is QuantScheme.INT8:
        codes = torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8, device=device)
        return QuantizedWeight(codes, scales, None, fmt)
    values = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, device=device)
    return QuantizedWeight(pack_int4(values), scales, -8 * scales if fmt.scheme.stores_mins else None, fmt)


def build_quant_cases(ops: TritonOps, spec: ModelSpec, dtype: torch.dtype, device: str, smoke: bool) -> list[Case]:
    """Each packed format's matmul on the MLP's two weights (gate_up [2I, H], down [H, I]) at decode and prefill
    sizes, against F.linear on the same weights in the kernel dtype."""
    elem = torch.finfo(dtype).bits // 8
    hidden, inter = spec.hidden_size, spec.intermediate_size
    cases = []
    for fmt in QUANT_FORMATS:
        for name, (out_features, in_features) in (("gate_up", (2 * inter, hidden)), ("down", (hidden, inter))):
            weight = random_quantized(fmt, out_features, in_features, device)
            dense = dequantize(weight, dtype)  # the float build's weight: the baseline
            packed = sum(t.numel() * t.element_size() for t in (weight.codes, weight.scales, weight.mins)
                         if t is not None)
            for t in ([1, 20] if smoke else [1, 16, 2048]):  # decode, batched decode, a prefill chunk
                x = torch.randn((t, in_features), dtype=dtype, device=device)
                moved = packed + t * (in_features + out_features) * elem
                cases.append(Case(f"quant_matmul_{fmt.scheme.value}", f"{name} T={t}", moved,
                                  2 * t * in_features * out_features,
                                  lambda x=x, weight=weight: ops.linear(x, weight),
                                  lambda x=x, dense=dense: F.linear(x, dense)))
    return cases


def measure_ceilings(dtype: torch.dtype) -> dict[str, float]:
    from triton.testing import do_bench

    src = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 256 MiB: far past L2
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    n = 8192
    a, b = torch.randn((n, n), dtype=dtype, device="cuda"), torch.randn((n, n), dtype=dtype, device="cuda")
    matmul_ms = do_bench(lambda: torch.matmul(a, b), return_mode="median")
    return {"copy_gb_per_s": 2 * src.numel() / copy_ms / 1e6, "matmul_tflop_per_s": 2 * n**3 / matmul_ms / 1e9}


def run_case(case: Case, ceilings: dict[str, float]) -> Result:
    from triton.testing import do_bench

    triton_ms = do_bench(case.triton_fn, return_mode="median")
    baseline_ms = do_bench(case.baseline_fn, return_mode="median")
    roofline_ms = max(case.bytes / ceilings["copy_gb_per_s"] / 1e6, case.flops / ceilings["matmul_tflop_per_s"] / 1e9)
    return Result(case.kernel, case.label, triton_ms, baseline_ms, baseline_ms / triton_ms,
                  case.bytes / triton_ms / 1e6, case.flops / triton_ms / 1e9, roofline_ms / triton_ms)


def smoke_check(case: Case) -> None:
    got, expected = case.triton_fn(), case.baseline_fn()
    got = got[0] if isinstance(got, tuple) else got
    expected = expected[0] if isinstance(expected, tuple) else expected
    if case.kernel == "prefill_attention":
        expected = expected[0].transpose(0, 1)  # [1, H, T, D] -> [T, H, D]
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-3, rtol=2e-3)
    print(f"smoke ok  {case.kernel:18s} {case.label}")


def save_plot(results: list[Result], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {path}")
        return
    labels = [f"{r.kernel}\n{r.label}" for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(max(10, len(results) * 0.9), 5))
    axes[0].bar(labels, [r.roofline_fraction for r in results])
    axes[0].set_ylabel("fraction of roofline (measured ceilings)")
    axes[1].bar(labels, [r.speedup for r in results])
    axes[1].axhline(1.0, color="gray", linewidth=0.8)
    axes[1].set_ylabel("speedup vs PyTorch baseline")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="bfloat16")
    p.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=16)
    p.add_argument("--out", default="bench_kernels", help="writes <out>.json and <out>.png")
    p.add_argument("--set", choices=CASE_SETS, default="all", dest="case_set",
                   help="which cases: the float kernels, the quantised matmuls, or both")
    p.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes, correctness only")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU here (torch.cuda.is_available() is False); nothing to time. "
              "Use --smoke to check the script's wiring on the CPU.", file=sys.stderr)
        return 2
    spec = make_spec("tiny" if args.smoke else args.shape)
    dtype = torch.float32 if args.smoke else getattr(torch, args.dtype)
    device = "cpu" if args.smoke else "cuda"
    torch.manual_seed(0)
    dtype_name = str(dtype).removeprefix("torch.")
    with tempfile.TemporaryDirectory() as kernel_dir:
        cases = []
        if args.case_set in ("all", "float"):
            plan = make_plan(spec, dtype_name, args.block_size)
            render_plan(plan, Path(kernel_dir) / "float")
            ops = TritonOps(Path(kernel_dir) / "float", args.smoke, plan.op_files(Language.TRITON))
            cases += build_cases(ops, spec, dtype, args.block_size, device, args.smoke)
        if args.case_set in ("all", "quant"):
            plan = make_plan(spec, dtype_name, args.block_size, QUANT_FORMATS[-1])  # one file serves both schemes
            render_plan(plan, Path(kernel_dir) / "quant")
            ops = TritonOps(Path(kernel_dir) / "quant", args.smoke, plan.op_files(Language.TRITON))
            cases += build_quant_cases(ops, spec, dtype, device, args.smoke)
        if args.smoke:
            for case in cases:
                smoke_check(case)
            checked = [{"kernel": c.kernel, "label": c.label} for c in cases]
            Path(args.out).with_suffix(".json").write_text(json.dumps({"smoke": True, "checked": checked}, indent=2))
            return 0
        ceilings = measure_ceilings(dtype)
        results = [run_case(case, ceilings) for case in cases]
    print(f"{torch.cuda.get_device_name()}  {args.shape} {args.dtype}  copy {ceilings['copy_gb_per_s']:.0f} GB/s  "
          f"matmul {ceilings['matmul_tflop_per_s']:.1f} TFLOP/s")
    print(f"{'kernel':18s} {'case':14s} {'triton ms':>10s} {'torch ms':>10s} {'speedup':>8s} {'GB/s':>8s} "
          f"{'TFLOP/s':>8s} {'roofline':>8s}")
    for r in results:
        print(f"{r.kernel:18s} {r.label:14s} {r.triton_ms:10.4f} {r.baseline_ms:10.4f} {r.speedup:8.2f} "
              f"{r.gb_per_s:8.0f} {r.tflop_per_s:8.2f} {r.roofline_fraction:8.2f}")
    out = Path(args.out)
    report = {"device": torch.cuda.get_device_name(), "shape": args.shape, "dtype": args.dtype, "set": args.case_set,
              "block_size": args.block_size, "ceilings": ceilings, "results": [asdict(r) for r in results]}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    save_plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
