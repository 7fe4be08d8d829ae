"""The cpu backend's fast paths give the plain PyTorch results."""

import pytest
import torch
import torch.nn.functional as F

from pllm.compiler.cpu_compile import find_compiler
from pllm.runtime.backends.cpu import cpu_linear, onednn
from pllm.runtime.backends.cpu.cpu_ops import TorchOps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 5, 64, 300])
def test_linear_equals_f_linear_bit_for_bit(dtype, num_tokens):
    """oneDNN's packed bf16 weights (where the CPU has its bf16 GEMM) give F.linear's bits; without it bf16 runs
    F.linear widened to fp32 (gemm_dtype), rounded once, from WIDEN_MIN_ROWS rows (fewer: bf16 F.linear), and fp32
    F.linear itself."""
    g = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, 96, generator=g).to(dtype)
    w = torch.randn(160, 96, generator=g).to(dtype)
    b = torch.randn(160, generator=g).to(dtype)
    ops = TorchOps()
    gemm = ops.gemm_dtype(dtype) if num_tokens >= cpu_linear.WIDEN_MIN_ROWS else dtype

    def linear(x, w, b=None):
        return F.linear(x.to(gemm), w.to(gemm), None if b is None else b.to(gemm)).to(dtype)

    assert torch.equal(ops.linear(x, w), linear(x, w))
    assert torch.equal(ops.linear(x, w, b), linear(x, w, b))
    assert torch.equal(ops.mlp(x, torch.cat([w, w.flip(0)]), w.t().contiguous()),
                       linear(F.silu(linear(x, w)) * linear(x, w.flip(0)), w.t().contiguous()))


def test_widened_linear_widens_a_big_weight_a_block_of_rows_at_a_time(monkeypatch):
    """Past WIDEN_ELEMENTS the weight is widened in blocks of output rows (the last one short): each output within
    fp32's sum bound of the exact product before one rounding to bf16, as is the whole GEMM's."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 96, generator=g).bfloat16()
    w = torch.randn(150, 96, generator=g).bfloat16()
    b = torch.randn(150, generator=g).bfloat16()
    whole = cpu_linear.widened_linear(x, w, b, torch.float32)
    assert torch.equal(whole, F.linear(x.float(), w.float(), b.float()).bfloat16())
    widened = []  # the weight each GEMM multiplies
    linear = F.linear
    monkeypatch.setattr(cpu_linear, "WIDEN_ELEMENTS", 64 * 96)  # blocks of 64, 64 and 22 rows
    monkeypatch.setattr(cpu_linear.F, "linear",
                        lambda x, w, b: widened.append((tuple(w.shape), w.dtype)) or linear(x, w, b))
    blocked = cpu_linear.widened_linear(x, w, b, torch.float32)
    monkeypatch.undo()
    assert widened == [((64, 96), torch.float32), ((64, 96), torch.float32), ((22, 96), torch.float32)]
    exact = x.double() @ w.double().T + b.double()
    gamma = 97 * 2.0**-24 / (1 - 97 * 2.0**-24)
    bound = gamma * (x.double().abs() @ w.double().abs().T + b.double().abs())
    for y in (blocked, whole):  # each rounded once from within the bound
        lo, hi = (exact - bound).bfloat16().double(), (exact + bound).bfloat16().double()
        assert bool(((y.double() >= torch.minimum(lo, hi)) & (y.double() <= torch.maximum(lo, hi))).all())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_compiled_cpu_kernels_in_the_engine_equal_pytorch_ops(tiny_build, dtype):
    """The compiled cpu kernels inside the model, first layer and final norm included, give the PyTorch ops' greedy
    tokens: in fp32 all of them (attention, RoPE); in bf16 RMSNorm and RoPE. The bf16 attention kernel keeps scores
    in fp32 where the PyTorch path rounds them to bf16, so it is more accurate rather than equal (its own test
    checks it against fp64); here it runs in both halves of the bf16 comparison."""
    from pllm import LLM, SamplingParams

    # chunked prompts: mixed steps with one-token and longer queries; no prefix cache, so the second run recomputes
    llm = LLM(str(tiny_build("llama", dtype=dtype)), backend="cpu", kv_cache_memory=1 << 22,
              max_num_batched_tokens=24, enable_prefix_caching=False)
    ops = llm.engine.runner.ops
    kernels = {"decode_attention": ops.decode_attention, "rms_norm_kernel": ops.rms_norm_kernel,
               "rope_kernel": ops.rope_kernel}
    if find_compiler() is not None:
        assert ops.decode_attention is not None and ops.rope_kernel is not None
        assert (ops.rms_norm_kernel is not None) == (dtype == "bfloat16")
    prompts = ["Hello, world!", "Paged attention keeps the KV cache in fixed-size blocks " * 2, "a", "def main():"]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    compiled = llm.generate(prompts, greedy, use_tqdm=False)
    for name in kernels:
        if not (name == "decode_attention" and dtype == "bfloat16"):
            setattr(ops.attentions if name == "decode_attention" else ops, name, None)  # (attention's routes)
    plain = llm.generate(prompts, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in compiled] == [o.outputs[0].token_ids for o in plain]


def test_weights_sharing_an_address_each_get_their_own_packing():
    ops = TorchOps()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    storage = torch.randn(64 * 64).to(torch.bfloat16)
    # two weights starting at one address (the second a prefix of the first's rows), as a freed weight's address
    # reused by the next one would be
    for weight in (storage.view(64, 64), storage[: 32 * 64].view(32, 64)):
        assert torch.equal(ops.linear(x, weight), torch.nn.functional.linear(x, weight))


@pytest.mark.parametrize("onednn_bf16", [True, False], ids=["onednn-bf16", "no-onednn-bf16"])
@pytest.mark.parametrize("num_tokens", [3, 64])
def test_bf16_experts_take_the_dense_linears_gemm(monkeypatch, onednn_bf16, num_tokens):
    """A bf16 MoE's experts multiply as the dense linears do: F.linear in bf16 where oneDNN has its bf16 GEMM,
    else widened to fp32 and rounded once from WIDEN_MIN_ROWS rows (either CPU's route, on any CPU, by the probe):
    3 tokens give each expert a few rows, 64 tokens (top 2 of 4) dozens."""
    from pllm.runtime.backends.cpu.cpu_moe import grouped_moe

    monkeypatch.setattr(onednn, "onednn_packs_bf16", lambda: onednn_bf16)
    monkeypatch.setattr(cpu_linear.CpuLinear, "packed",
                        lambda self, weight: cpu_linear.PackedFloat(weight, None, None))
    g = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, 64, generator=g).bfloat16()
    gate_up = (torch.randn(4, 96, 64, generator=g) / 8).bfloat16()
    down = (torch.randn(4, 64, 48, generator=g) / 7).bfloat16()
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, 2, generator=g)

    def widened(rows, w):  # from WIDEN_MIN_ROWS rows, as the dense linears
        if len(rows) < cpu_linear.WIDEN_MIN_ROWS:
            return F.linear(rows, w)
        return F.linear(rows.float(), w.float()).bfloat16()

    seen = []  # the dtype each expert GEMM multiplied in
    linear = F.linear
    monkeypatch.setattr(cpu_linear.F, "linear", lambda a, *args: seen.append(a.dtype) or linear(a, *args))
    out = TorchOps().moe(x, weights, ids, gate_up, down)
    monkeypatch.undo()
    expected = grouped_moe(x, weights, ids, gate_up, down, F.linear if onednn_bf16 else widened)
    assert torch.equal(out, expected)
    widens = not onednn_bf16 and num_tokens * 2 >= 4 * cpu_linear.WIDEN_MIN_ROWS  # experts of many rows
    assert seen and set(seen) == {torch.float32 if widens else torch.bfloat16}


def test_rope_rows_are_the_cache_rows_expanded():
    """The step's cos and signed-sin rows, gathered from tables made once per cache and dtype, equal the rows built
    from the cache directly (cos's half twice; -sin then sin): for two caches of one shape (gemma3's local and
    global), a third of another rotary_dim, two dtypes on one ops, and steps that keep their positions tensor while
    the cache or the dtype changes (a model's layers alternate caches within one step)."""
    ops = TorchOps()
    local, global_ = torch.randn(40, 16), torch.randn(40, 16)
    other = torch.randn(40, 24)
    same_step = torch.tensor([5, 5, 0])
    f32, bf16 = torch.float32, torch.bfloat16
    calls = [(local, [3, 0, 39], f32), (global_, [3, 0, 39], f32), (other, [7], f32), (local, [3, 0, 39], bf16),
             (local, same_step, f32), (global_, same_step, f32), (global_, same_step, bf16),
             (other, [39, 1, 2, 3], bf16)]
    for cache, positions, dtype in calls:
        rows = positions if isinstance(positions, torch.Tensor) else torch.tensor(positions)
        cos, signed_sin = ops._rope_rows(rows, cache, dtype)
        half = cache.shape[1] // 2
        picked = cache[rows]
        want_cos = torch.cat((picked[:, :half], picked[:, :half]), dim=-1).to(dtype)[:, None, :]
        want_sin = torch.cat((-picked[:, half:], picked[:, half:]), dim=-1).to(dtype)[:, None, :]
        assert cos.shape == want_cos.shape and cos.stride() == want_cos.stride()  # the kernels index [T, rotary_dim]
        assert torch.equal(cos, want_cos) and torch.equal(signed_sin, want_sin)
        assert cos.dtype == signed_sin.dtype == dtype
    assert len(ops._rope_table_cache) == 6  # one pair per (cache, dtype) met: 3 caches x 2 dtypes, not per step
