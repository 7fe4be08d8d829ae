"""Offline throughput: pllm LLM.generate vs Hugging Face generate in padded batches, same model, machine and dtype.

    python tools/bench_throughput.py build/ [--num-requests 64] [--skip-hf]
    python tools/bench_throughput.py build-tp2/ --tensor-parallel-size 2 --single-rank-build build/ [--rounds 2]

Prints output tokens/s for both, their ratio, peak memory, and pllm's decode step at batch 64 (and at batch 1) as a
fraction of the CPU's matmul roofline (in the dtype the engine's float GEMMs multiply in: fp32 for bf16 where oneDNN
has no bf16 GEMM) measured in the same run; where the build has compiled cpu kernels, the same steps run beside them
with the PyTorch attention, and with PyTorch ops only, as baselines. A benchmark, not a test: numbers depend on the
machine.

With --tensor-parallel-size N: the same requests through LLM(tensor_parallel_size=N) on the split build and through
one process on --single-rank-build (the same model compiled for one rank), taking turns for --rounds rounds, and
their ratio; on a cpu the ranks share the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch


def make_requests(num: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens): prompts 16-512 tokens, outputs 16-256 tokens, drawn log-uniformly."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(num):
        prompt_len = int(round(2 ** rng.uniform(4, 9)))
        out_len = int(round(2 ** rng.uniform(4, 8)))
        reqs.append(([rng.randrange(100, vocab) for _ in range(prompt_len)], out_len))
    return reqs


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_roofline(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul: the practical ceiling for this CPU in this dtype."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def bench_pllm(build_dir: str, reqs, dtype_note: str, tensor_parallel_size: int = 1) -> dict:
    from pllm import LLM, SamplingParams

    llm = LLM(build_dir, backend="cpu", max_num_seqs=256, max_num_batched_tokens=2048,
              tensor_parallel_size=tensor_parallel_size)
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for _, m in reqs]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert num_out == sum(m for _, m in reqs)
    return {"engine": f"pllm ({dtype_note})", "seconds": elapsed, "output_tokens": num_out, "llm": llm}


def bench_hf(hf_model, reqs, batch_size: int, pad_id: int, device: str = "cpu") -> dict:
    """As a user would write it: padded batches of `batch_size`, each generating its longest requested length, on
    `device` (where hf_model lives; a cuda run is synchronized before the clock stops)."""
    num_out = 0
    t = time.perf_counter()
    for i in range(0, len(reqs), batch_size):
        batch = reqs[i : i + batch_size]
        max_len = max(len(p) for p, _ in batch)
        ids = torch.full((len(batch), max_len), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (p, _) in enumerate(batch):  # left padding, as decoder-only generation needs
            ids[row, max_len - len(p) :] = torch.tensor(p)
            mask[row, max_len - len(p) :] = 1
        new = max(m for _, m in batch)
        with torch.inference_mode():
            hf_model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=pad_id,
            )
        num_out += sum(m for _, m in batch)  # only the tokens each request asked for count
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"engine": "HF transformers generate", "seconds": time.perf_counter() - t, "output_tokens": num_out}


@contextmanager
def decode_batch(llm, batch: int, prompt_len: int, num_steps: int):
    """`batch` requests of random `prompt_len`-token prompts, greedy, each allowed `num_steps` more tokens, prefilled
    so every later engine step is decode-only; aborted on leaving."""
    from pllm import SamplingParams

    engine = llm.engine
    if prompt_len + num_steps > engine.max_model_len:  # the engine would cut max_tokens, and steps would run empty
        raise ValueError(f"a {prompt_len}-token context and {num_steps} steps pass the model's "
                         f"{engine.max_model_len} positions")
    rng = random.Random(1)
    for i in range(batch):
        ids = [rng.randrange(100, engine.spec.vocab_size) for _ in range(prompt_len)]
        engine.add_request(f"decode-{i}", ids, SamplingParams(temperature=0.0, max_tokens=num_steps, ignore_eos=True))
    sched = engine.scheduler
    while sched.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running):
        engine.step()
    try:
        yield engine
    finally:
        for i in range(batch):
            engine.abort_request(f"decode-{i}")


def time_decode_steps(llm, batch: int, prompt_len: int, variants: dict, rounds: int = 4,
                      steps: int = 8) -> tuple[dict[str, list[float]], int]:
    """Seconds per decode-only step at `batch` sequences, per variant and round; and the mean context length.

    `variants` maps a name to a function that switches the engine to it. The variants take turns on the same batch,
    `steps` steps at a time for `rounds` rounds, so drift on a shared machine hits them alike.
    """
    num_steps = rounds * len(variants) * steps
    times: dict[str, list[float]] = {name: [] for name in variants}
    with decode_batch(llm, batch, prompt_len, num_steps + len(variants) + 8) as engine:
        for activate in variants.values():  # warm-up: one step each
            activate()
            engine.step()
        for _ in range(rounds):
            for name, activate in variants.items():
                activate()
                t = time.perf_counter()
                for _ in range(steps):
                    engine.step()  # returns sampled tokens to the host: the step has finished on any device
                times[name].append((time.perf_counter() - t) / steps)
    return times, prompt_len + num_steps // 2


def decode_roofline_fractions(llm, batch: int, prompt_len: int, peak: float, variants: dict, rounds: int = 4,
                              steps: int = 8) -> dict[str, dict]:
    """Decode-only steps at `batch` sequences (time_decode_steps) as a fraction of the matmul roofline `peak`; FLOPs
    counted for the linear layers and attention. Each variant reports its best round (the least disturbed) and the
    median."""
    spec = llm.engine.spec
    times, ctx = time_decode_steps(llm, batch, prompt_len, variants, rounds, steps)
    p_lin = 2 * spec.num_hidden_layers * spec.hidden_size * (spec.q_size + spec.kv_size) + (
        spec.num_hidden_layers * 3 * spec.hidden_size * spec.intermediate_size
    ) + spec.vocab_size * spec.hidden_size
    attn = 4 * spec.num_hidden_layers * spec.num_attention_heads * spec.head_dim * ctx
    flops = batch * (2 * p_lin + attn)
    out = {}
    for name, ts in times.items():
        best, median = min(ts), sorted(ts)[len(ts) // 2]
        out[name] = {"batch": batch, "context": ctx, "step_ms": best * 1e3, "median_step_ms": median * 1e3,
                     "tok_s": batch / best, "gflops": flops / best / 1e9, "fraction_of_roofline": flops / best / peak,
                     "median_fraction_of_roofline": flops / median / peak}
    return out


KERNEL_FIELDS = ("decode_attention", "rms_norm_kernel", "rope_kernel")  # TorchOps' compiled cpu kernels
DECODE_BATCHES = (64, 1)  # the batch, and single-stream


def cpu_kernel_variants(ops) -> dict:
    """The cpu backend with every compiled kernel the build has; with all but the decode attention; with none."""
    kernels = {name: getattr(ops, name, None) for name in KERNEL_FIELDS}
    if all(k is None for k in kernels.values()):
        return {"pllm": lambda: None}

    def use(*names: str):
        return lambda: [setattr(ops, name, kernels[name] if name in names else None) for name in KERNEL_FIELDS]

    return {"compiled kernels": use(*KERNEL_FIELDS),
            "PyTorch attention": use("rms_norm_kernel", "rope_kernel"),
            "PyTorch ops": use()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build_dir")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks of build_dir (split for them)")
    ap.add_argument("--single-rank-build", default=None, help="with --tensor-parallel-size: the one-rank baseline")
    ap.add_argument("--rounds", type=int, default=2, help="with --tensor-parallel-size: rounds of taking turns")
    args = ap.parse_args()
    if args.tensor_parallel_size > 1:
        if args.single_rank_build is None:
            ap.error("--tensor-parallel-size needs --single-rank-build (the same model compiled for one rank)")
        bench_tensor_parallel(args)
        return

    manifest = json.loads((Path(args.build_dir) / "manifest.json").read_text())
    dtype = getattr(torch, manifest["dtype"])
    vocab = manifest["spec"]["vocab_size"]
    reqs = make_requests(args.num_requests, vocab, args.seed)
    print(f"{args.num_requests} requests, prompts {sum(len(p) for p, _ in reqs)} tokens, "
          f"outputs {sum(m for _, m in reqs)} tokens, dtype {manifest['dtype']}, {torch.get_num_threads()} threads")

    # in the dtype the engine's float GEMMs multiply in: fp32 for bf16 on a CPU where oneDNN has no bf16 GEMM (torch's
    # own bf16 matmul there is two orders of magnitude slower, no ceiling for anything the engine runs)
    from pllm.runtime.backends.cpu.cpu_linear import CpuLinear

    gemm = CpuLinear().gemm_dtype(dtype)
    peak = matmul_roofline(gemm)
    print(f"matmul roofline ({str(gemm).removeprefix('torch.')}, 2048^3): {peak / 1e9:.0f} GFLOP/s")
    results = []
    pllm_res = bench_pllm(args.build_dir, reqs, manifest["dtype"])
    llm = pllm_res.pop("llm")
    results.append(pllm_res)
    rss_pllm = peak_rss_mib()
    variants = cpu_kernel_variants(llm.engine.runner.ops)
    decodes = {batch: decode_roofline_fractions(llm, batch, 128, peak, variants) for batch in DECODE_BATCHES}
    del llm
    if not args.skip_hf:
        import transformers

        from pllm.compiler.source import default_gguf_path

        source = manifest["source"]
        if source.endswith(".gguf") or source.lower().startswith("smollm2"):
            path = default_gguf_path() if not source.endswith(".gguf") else Path(source)
            # float32 dequantises to plain Linear layers; asking for bf16 here would keep packed GGUF weights and
            # dequantise in every matmul, an unfairly slow baseline. Cast afterwards instead.
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32
            )
        else:
            hf = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        hf = hf.to(dtype).eval()
        pad = manifest["spec"]["eos_token_ids"][0] if manifest["spec"]["eos_token_ids"] else 0
        bench_hf(hf, reqs[:2], args.hf_batch_size, pad)  # warm-up
        results.append(bench_hf(hf, reqs, args.hf_batch_size, pad))

    print(f"\n{'engine':<28} {'seconds':>9} {'out tok':>8} {'out tok/s':>10} {'ratio':>7}")
    base = results[-1]["output_tokens"] / results[-1]["seconds"]
    for r in results:
        tps = r["output_tokens"] / r["seconds"]
        r["output_tok_s"] = tps
        print(f"{r['engine']:<28} {r['seconds']:9.1f} {r['output_tokens']:8d} {tps:10.1f} {tps / base:6.2f}x")
    print(f"peak RSS: {rss_pllm:.0f} MiB after pllm, {peak_rss_mib():.0f} MiB after all")
    for per_variant in decodes.values():
        first = next(iter(per_variant.values()))
        print(f"\npllm decode at batch {first['batch']}, context ~{first['context']} (best of rounds; median):")
        for name, d in per_variant.items():
            print(f"  {name:<20} {d['step_ms']:6.1f} ms/step ({d['median_step_ms']:.1f}), {d['tok_s']:4.0f} tok/s, "
                  f"{d['gflops']:3.0f} GFLOP/s = {100 * d['fraction_of_roofline']:.1f}% "
                  f"({100 * d['median_fraction_of_roofline']:.1f}%) of the matmul roofline")
        if len(per_variant) == 3:
            (_, full), (_, no_attention), (_, plain) = per_variant.items()
            for what, base in (("compiled attention", no_attention), ("all compiled kernels", plain)):
                print(f"  {what}: the step is {base['step_ms'] / full['step_ms']:.2f}x faster "
                      f"(median {base['median_step_ms'] / full['median_step_ms']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "decode": decodes, "roofline": peak,
                                                "roofline_dtype": str(gemm).removeprefix("torch.")}, indent=2))


def bench_tensor_parallel(args: argparse.Namespace) -> None:
    """N ranks against one process on the same requests, alternating which goes first each round."""
    manifest = json.loads((Path(args.build_dir) / "manifest.json").read_text())
    reqs = make_requests(args.num_requests, manifest["spec"]["vocab_size"], args.seed)
    n = args.tensor_parallel_size
    runs = {1: (args.single_rank_build, 1), n: (args.build_dir, n)}
    tok_s: dict[int, list[float]] = {1: [], n: []}
    print(f"{args.num_requests} requests, outputs {sum(m for _, m in reqs)} tokens, dtype {manifest['dtype']}, "
          f"{n} ranks vs 1, {args.rounds} rounds taking turns")
    for round_ in range(args.rounds):
        for size in ((1, n) if round_ % 2 == 0 else (n, 1)):
            build_dir, tp = runs[size]
            res = bench_pllm(build_dir, reqs, manifest["dtype"], tensor_parallel_size=tp)
            res.pop("llm").close()
            tok_s[size].append(res["output_tokens"] / res["seconds"])
            print(f"  round {round_ + 1}: {size} rank(s) {tok_s[size][-1]:8.1f} out tok/s")
    best = {k: max(v) for k, v in tok_s.items()}
    print(f"best of rounds: 1 rank {best[1]:.1f} tok/s, {n} ranks {best[n]:.1f} tok/s, ratio {best[n] / best[1]:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"tok_s": tok_s, "ratio": best[n] / best[1]}, indent=2))


if __name__ == "__main__":
    main()
