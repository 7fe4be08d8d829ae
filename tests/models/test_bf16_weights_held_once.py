"""bf16 builds hold each linear weight once where oneDNN's packed copy is in panels the compiled step reads
(runtime/backends/cpu/cpu_linear.py, templates/cpu_decode_step_panels.cpp.inc): the mapped rows' pages leave the
process, and the tokens are those of an engine whose rows stay."""

from __future__ import annotations

import logging

import pytest

from pllm import LLM, SamplingParams
from pllm.compiler.build import BuildOptions, build
from pllm.compiler.cpu_compile import find_compiler
from pllm.runtime.backends.cpu import onednn

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = ["Hello, world!", "Paged attention keeps the KV cache", " ".join(["tokens"] * 20)]  # the last ~120 tokens

pytestmark = [
    pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH"),
    pytest.mark.skipif(onednn.panel_rows() is None,
                       reason="oneDNN packs bf16 weights in no panel layout on this CPU (no AVX-512 BF16 or AMX)"),
]


def test_rows_leave_the_process_and_the_tokens_stay(tiny_dir, tmp_path, caplog):
    """A bf16 build loaded mapped (the default): every layer linear and the LM head read by the step in oneDNN's
    panels, their rows' pages dropped, and each weight, read back from the file, still what its panels hold. Greedy
    tokens (a prefill past the GEMV's rows, oneDNN's GEMM on the same copy, included) equal an engine whose weights
    sit in huge pages (anonymous memory: its rows stay, the step reads the same panels), and the step's own log says
    which linears it reads in panels."""
    out = build(str(tiny_dir("llama")), tmp_path / "b", BuildOptions(dtype="bfloat16", progress=False))
    tokens = {}
    for huge_pages in (False, True):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pllm"):
            llm = LLM(str(out), backend="cpu", kv_cache_memory=1 << 24, huge_pages=huge_pages)
            tokens[huge_pages] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        ops = llm.engine.runner.ops
        model = llm.engine.runner.model
        stack = model.decode_stack
        assert stack is not None
        assert sum(n for label, n in stack.kinds.items() if "panels" in label) == 4 * len(model.layers), stack.kinds
        held = [e for e in ops.linears._packed.values() if e.panels is not None]
        assert any(e.weight is model.lm_head for e in held)  # the head's GEMV reads its panels too
        assert (ops.linears.rows_dropped > 0) == (not huge_pages), ops.linears.rows_dropped
        said = "rows' pages dropped from the process" if not huge_pages else "beside their rows, which stay resident"
        assert said in caplog.text, caplog.text
        # with huge_pages the panels are asked into 2 MiB pages too (the tiny model's hold no whole one)
        assert ops.linears.huge_pages == huge_pages
        assert ("moved into 2 MiB pages (huge_pages)" in caplog.text) == huge_pages, caplog.text
        for entry in held:
            assert ops.decode_step.panels_match(entry.weight, entry.panels)
    assert tokens[False] == tokens[True]


def test_without_the_layout_the_step_reads_rows(tiny_dir, tmp_path, monkeypatch):
    """Where oneDNN's layout is not panels (onednn.panel_rows None: another CPU), nothing is read in panels and no
    rows are dropped: oneDNN keeps its own copy beside them, as before."""
    monkeypatch.setattr(onednn, "panel_rows", lambda: None)
    out = build(str(tiny_dir("llama")), tmp_path / "b", BuildOptions(dtype="bfloat16", progress=False))
    llm = LLM(str(out), backend="cpu", kv_cache_memory=1 << 24)
    assert len(llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == GREEDY.max_tokens
    linears = llm.engine.runner.ops.linears
    assert linears.rows_dropped == 0 and linears.memory_note() is None
    assert not any("panels" in label for label in llm.engine.runner.model.decode_stack.kinds)
