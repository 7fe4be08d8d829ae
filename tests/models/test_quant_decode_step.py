"""Quantised builds decode through the compiled step (packed weights read packed) and give the tokens the per-op
packed path gives, in float32."""

from __future__ import annotations

import logging

import pytest
import torch

from pllm import LLM, SamplingParams
from pllm.compiler.build import BuildOptions, build
from pllm.compiler.cpu_compile import find_compiler
from pllm.compiler.quantize import Quantization
from pllm.models.quant import dequantize

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = ["Hello, world!", "Paged attention keeps the KV cache", "def main():"]

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")


@pytest.mark.parametrize("model_type, quantization", [("llama", Quantization.INT8), ("qwen2", Quantization.INT4)])
def test_greedy_tokens_equal_on_and_off_the_compiled_step(tiny_dir, tmp_path, caplog, model_type, quantization):
    out = build(str(tiny_dir(model_type)), tmp_path / "b",
                BuildOptions(dtype="float32", progress=False, quantization=quantization))
    with caplog.at_level(logging.INFO, logger="pllm"):
        llm = LLM(str(out), backend="cpu", kv_cache_memory=1 << 24)
    model = llm.engine.runner.model
    assert model.decode_stack is not None and model.decode_stack.packed
    assert "reading packed weights" in caplog.text
    compiled = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    model.decode_stack = None  # every decode step op by op, through the same packed GEMV
    per_op = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert all(len(tokens) == GREEDY.max_tokens for tokens in compiled)
    assert compiled == per_op


def test_packed_rows_leave_the_process_and_the_tokens_stay(tiny_dir, tmp_path, caplog):
    """A packed build loaded mapped (the default): once panels are made the rows' pages are dropped (on CPUs that
    make panels) and read back from the file as they were: each such weight's dequantisation from its panels equals
    models.quant.dequantize of its rows. Greedy tokens, a prefill past the packed GEMV's 64 rows (the dequantiser)
    included, equal an engine that keeps its rows (weights read into huge pages: anonymous memory, never dropped)."""
    out = build(str(tiny_dir("llama")), tmp_path / "b",
                BuildOptions(dtype="float32", progress=False, quantization=Quantization.INT4))
    prompts = [*PROMPTS, " ".join(["tokens"] * 20)]  # ~120 tokens
    tokens = {}
    for huge_pages in (False, True):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pllm"):
            llm = LLM(str(out), backend="cpu", kv_cache_memory=1 << 24, huge_pages=huge_pages)
        tokens[huge_pages] = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        kernel = llm.engine.runner.ops.quant_kernel
        repacked = [entry[0] for entry in kernel._weights.values() if entry[2] is not None]
        assert (kernel.rows_dropped > 0) == (bool(repacked) and not huge_pages), (len(repacked), kernel.rows_dropped)
        said = "rows' pages dropped from the process" if not huge_pages else "beside their rows, which stay resident"
        assert (said in caplog.text) == bool(repacked), caplog.text
        for weight in repacked:
            assert torch.equal(kernel.dequantize(weight, torch.float32), dequantize(weight))
    assert tokens[False] == tokens[True]
