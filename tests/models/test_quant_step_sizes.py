"""A quantised build means the same at every step size: past the packed rows' 64 rows (prefill, a verify step of
many guesses, a large batch) the float GEMM over the dequantised weight takes the activations rounded as the packed
rows round them (models/quant.py), so in float32 a token's greedy continuation does not hang on how its steps were
cut: speculation on or off, a prompt computed whole or mostly from the prefix cache."""

from __future__ import annotations

import random

import pytest
import torch

from pllm import LLM, SamplingParams
from pllm.compiler.build import BuildOptions, build
from pllm.compiler.cpu_compile import find_compiler
from pllm.compiler.quantize import Quantization
from pllm.models.quant import dequantize_activation, quantize_activation
from pllm.runtime.backends.cpu import cpu_linear
from pllm.runtime.backends.cpu.cpu_quant_linear import QUANT_GEMV_MAX_TOKENS

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")


@pytest.fixture(scope="module")
def quant_builds(tiny_dir, tmp_path_factory):
    """Factory: quantization -> a float32 build of the tiny llama (hidden 64, 2 layers, vocabulary 400)."""
    cache: dict = {}

    def make(quantization: Quantization):
        if quantization not in cache:
            out = tmp_path_factory.mktemp(f"q-{quantization.value}") / "build"
            cache[quantization] = build(str(tiny_dir("llama")), out,
                                        BuildOptions(dtype="float32", progress=False, quantization=quantization))
        return cache[quantization]

    return make


@pytest.fixture
def step_rows(monkeypatch):
    """The row counts the packed linears are called with."""
    rows: list[int] = []
    run = cpu_linear.CpuLinear._quant_linear

    def counted(self, x, weight, bias):
        rows.append(x.reshape(-1, x.shape[-1]).shape[0])
        return run(self, x, weight, bias)

    monkeypatch.setattr(cpu_linear.CpuLinear, "_quant_linear", counted)
    return rows


@pytest.mark.parametrize("quantization", [Quantization.INT4, Quantization.INT8])
def test_greedy_equal_with_speculation_on_and_off(quant_builds, step_rows, quantization):
    """Six sequences batched, 16 guesses a step: the verify steps run past the packed rows (up to 6 x 17 rows),
    the steps without speculation at one row a sequence; the same greedy tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    prompts = [{"prompt_token_ids": [63] * (30 + i)} for i in range(5)] + [{"prompt_token_ids": [5, 9, 17, 200, 33]}]
    out = {}
    for spec in (None, {"method": "ngram", "num_speculative_tokens": 16, "prompt_lookup_max": 3,
                        "prompt_lookup_min": 1}):
        llm = LLM(str(quant_builds(quantization)), backend="cpu", kv_cache_memory=1 << 25,
                  enable_prefix_caching=False, speculative_config=spec)
        step_rows.clear()
        out[spec is None] = [list(r.outputs[0].token_ids) for r in llm.generate(prompts, params, use_tqdm=False)]
        if spec is not None:  # the decode steps' verify rows, not only the prompts, went past the packed rows
            assert any(QUANT_GEMV_MAX_TOKENS < n < sum(len(p["prompt_token_ids"]) for p in prompts)
                       for n in step_rows), sorted(set(step_rows))
    assert out[True] == out[False]


@pytest.mark.parametrize("quantization", [Quantization.INT4, Quantization.INT8])
def test_the_same_request_twice_gives_the_same_tokens(quant_builds, step_rows, quantization):
    """An 80-token prompt computed whole (80 rows: the float GEMM), then again with 64 of its tokens from the prefix
    cache (16 rows: the packed rows): the same greedy tokens, for each of eight prompts."""
    llm = LLM(str(quant_builds(quantization)), backend="cpu", kv_cache_memory=1 << 24)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    rng = random.Random(9)
    for _ in range(8):
        prompt = {"prompt_token_ids": [rng.randrange(3, 390) for _ in range(80)]}
        step_rows.clear()
        first = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        assert max(step_rows) == 80
        step_rows.clear()
        again = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        assert max(step_rows) == 16
        assert list(again) == list(first)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_round_activations_is_the_packed_rows_rounding(quant_builds, x_dtype):
    """The compiled rounding of the fp32 GEMM's activations: dequantize_activation(*quantize_activation(x)) bit for
    bit (an all-zero block, a block of one value, ties to even, codes of zero from negative values: +0), from fp32
    and from bf16 activations."""
    llm = LLM(str(quant_builds(Quantization.INT8)), backend="cpu", kv_cache_memory=1 << 24)
    kernel = llm.engine.runner.ops.quant_kernel
    assert kernel is not None and kernel._round is not None
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(70, 256, generator=g) * torch.logspace(-3, 3, 70)[:, None]).to(x_dtype)
    x[0, :32] = 0
    x[1, 32:64] = 1.5
    x[2, :32] = torch.arange(32) - 15.5  # max 16.5: codes at x * 127 / 16.5
    x[3, :32] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -0.25] + [0.0] * 25)  # d = 1: ties, to even
    want = dequantize_activation(*quantize_activation(x))
    got = kernel.round_activations(x.contiguous())
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(want))  # -0.5 -> code 0 -> +0, as the int8 code is
