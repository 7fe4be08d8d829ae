"""Windowed layers hold no more KV than their window: per-group pools, blocks returned as the window passes,
the budget split and the start-up log, with greedy output still equal to transformers'."""

import logging
import re

import pytest
import torch
import transformers

from pllm import LLM, SamplingParams
from pllm.models.kv_groups import KvGroup, kv_groups
from pllm.runtime.worker.kv_budget import SchedulingLimits, split_budget, windowed_need

from .test_gemma3 import PROMPTS, QUIRKS, SOFTCAPPED
from .test_hf_equivalence import FAMILY_PROMPTS, check_family_matches_hf, hf_greedy, kv_block_bytes

BLOCK_SIZE = 16  # the tiny builds'
LONG = 150  # decoded tokens: the sequences pass the window many times over
WIDE = {**QUIRKS, "sliding_window": 40}  # a window of several blocks


def test_mistral_windowed_matches_hf_batched_chunked_preempted(tiny_dir, tiny_build):
    """Every layer windowed (one windowed group): equal to transformers batched, then chunked 16 tokens a step
    through an 8-block cache, which preempts."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir("mistral", sliding_window=6)),
                                                           dtype=torch.float32)
    check_family_matches_hf(hf, tiny_build("mistral", sliding_window=6))


@pytest.mark.parametrize("model_type, overrides", [("phi3", {"sliding_window": 6, "rope_scaling": None}),
                                                    ("mistral", {"sliding_window": 6, "use_sliding_window": False}),
                                                    ("mixtral", {"sliding_window": 6}),
                                                    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 6})])
def test_families_windowing_every_layer_match_hf_batched_chunked_preempted(tiny_dir, tiny_build, model_type,
                                                                           overrides):
    """phi3 (Phi-3-mini-4k's 2047 of 4096), mistral (whose `use_sliding_window` transformers does not read), mixtral
    and qwen3_moe window every layer whenever the window is in use, as transformers masks them."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir(model_type, **overrides)), dtype=torch.float32)
    build = tiny_build(model_type, **overrides)
    check_family_matches_hf(hf, build)
    groups = LLM(str(build), backend="cpu", kv_cache_memory=1 << 22).engine.kv.managers
    assert [m.group.window for m in groups] == [6]


@pytest.mark.parametrize("model_type, layers", [("qwen2", {"max_window_layers": 1}),
                                                 ("qwen3", {"layer_types": ["sliding_attention", "full_attention"]})])
def test_qwen_windows_on_some_layers_match_hf_batched_chunked_preempted(tiny_dir, tiny_build, model_type, layers):
    """qwen2/qwen3 window only the layers transformers derives (from max_window_layers on, or layer_types'
    sliding_attention ones): one windowed and one global group, equal to transformers batched, then chunked 16
    tokens a step through an 8-block cache, which preempts."""
    overrides = {"use_sliding_window": True, "sliding_window": 6, **layers}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir(model_type, **overrides)), dtype=torch.float32)
    assert hf.config.layer_types.count("sliding_attention") == 1
    build = tiny_build(model_type, **overrides)
    check_family_matches_hf(hf, build)
    groups = LLM(str(build), backend="cpu", kv_cache_memory=1 << 22).engine.kv.managers
    assert sorted(str(m.group.window) for m in groups) == ["6", "None"]


def test_mistral_windowed_interpret_matches_hf_chunked_preempted(tiny_dir, tiny_build):
    """The rendered Triton kernels read the windowed tables (returned blocks pointing at the padding block)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir("mistral", sliding_window=6)),
                                                           dtype=torch.float32)
    build = tiny_build("mistral", sliding_window=6)
    llm = LLM(str(build), backend="interpret", kv_cache_memory=5 * kv_block_bytes(hf.config),
              max_num_batched_tokens=16)
    prompts = FAMILY_PROMPTS[4:8]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    dropped = []  # blocks the sequence's table had returned, after each of its steps
    advance = llm.engine.kv.advance
    llm.engine.kv.advance = lambda request: (advance(request), dropped.append(request.block_tables[0].num_dropped))
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out in outs:
        assert out.outputs[0].token_ids == hf_greedy(hf, out.prompt_token_ids, 12), out.prompt
    assert llm.engine.scheduler.num_preemptions > 0 and max(dropped) >= 1
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_an_all_windowed_model_serves_sequences_longer_than_its_cache(tiny_dir, tiny_build):
    """7 blocks hold 112 tokens; a sequence of about 170 still runs, as only its window stays cached."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir("mistral", sliding_window=6)),
                                                           dtype=torch.float32)
    llm = LLM(str(tiny_build("mistral", sliding_window=6)), backend="cpu",
              kv_cache_memory=8 * kv_block_bytes(hf.config), max_num_batched_tokens=16)
    assert llm.engine.max_model_len == 512 and llm.engine.kv.num_blocks * BLOCK_SIZE == 112
    out = llm.generate([PROMPTS[4]], SamplingParams(temperature=0.0, max_tokens=LONG, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.prompt_token_ids) + LONG > 112
    assert out.outputs[0].token_ids == hf_greedy(hf, out.prompt_token_ids, LONG)


@pytest.fixture(scope="module")
def wide_gemma3(tiny_dir, tiny_build):
    hf = transformers.Gemma3ForCausalLM.from_pretrained(str(tiny_dir("gemma3_text", **WIDE)), dtype=torch.float32,
                                                        attn_implementation=SOFTCAPPED)
    return hf, tiny_build("gemma3_text", **WIDE)


def test_gemma3_windowed_blocks_stay_bounded_while_decoding_long(wide_gemma3, caplog):
    """Two groups (global layer 1, windowed layers 0 and 2). While 4 sequences decode 150 tokens each, a windowed
    table never holds more than the window behind the next query plus one block, the global one holds everything,
    and the tokens equal transformers'. The start-up log states each group's budget."""
    hf, build = wide_gemma3
    with caplog.at_level(logging.INFO, logger="pllm"):
        llm = LLM(str(build), backend="cpu", kv_cache_memory=1 << 22, max_num_batched_tokens=16, max_num_seqs=4)
    groups = kv_groups(llm.engine.spec)
    assert groups == (KvGroup((1,), None), KvGroup((0, 2), 40))
    budgets = llm.engine.runner.kv_budgets
    line = next(r.getMessage() for r in caplog.records if "KV budget per layer group" in r.getMessage())
    for b in budgets:
        kind = "global" if b.group.window is None else f"window {b.group.window}"
        layers = ",".join(map(str, b.group.layers)) if b.group.window is None else "0,2"
        expected = (f"layers {layers} ({kind}): {b.num_blocks} blocks x {BLOCK_SIZE} tokens = "
                    f"{b.num_blocks * BLOCK_SIZE} tokens, {b.num_bytes} bytes")
        assert expected in line, line
    assert any("prefix caching off: windowed layers" in r.getMessage() for r in caplog.records)
    # the windowed group was sized by what it can use; the global one took the rest of the 4 MiB
    limits = SchedulingLimits(llm.engine.config.max_num_seqs, 16, llm.engine.max_model_len)
    assert budgets[1].num_blocks == windowed_need(groups[1], limits, BLOCK_SIZE) < budgets[0].num_blocks

    seen = []  # (computed tokens, windowed live blocks, global live blocks) after every step of every sequence
    advance = llm.engine.kv.advance

    def spy(request):
        advance(request)
        glob, win = request.block_tables
        seen.append((request.num_computed_tokens, len(win.block_ids), len(glob.block_ids)))

    llm.engine.kv.advance = spy
    params = SamplingParams(temperature=0.0, max_tokens=LONG, ignore_eos=True)
    outs = llm.generate(PROMPTS[:4], params, use_tqdm=False)
    for out in outs:
        assert out.outputs[0].token_ids == hf_greedy(hf, out.prompt_token_ids, LONG), out.prompt
    bound = -(-(40 - 1) // BLOCK_SIZE) + 1
    assert max(win for _, win, _ in seen) == bound  # reached, never passed
    for computed, win, glob in seen:
        assert win <= bound and glob == -(-computed // BLOCK_SIZE)
    assert max(glob for _, _, glob in seen) > 2 * bound
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_split_gives_long_contexts_the_memory_of_the_global_layers():
    """Gemma 3 270M's shape (18 layers, every 6th global, window 512): the global layers get almost all of a
    budget, so a sequence can be about 6x longer than if every layer kept its whole context."""
    groups = (KvGroup((5, 11, 17), None), KvGroup(tuple(i for i in range(18) if (i + 1) % 6), 512))
    limits = SchedulingLimits(max_num_seqs=4, max_num_batched_tokens=2048, max_model_len=32768)
    budget = 10_000_000  # bytes, one byte per layer-block
    glob, win = split_budget(groups, 1, budget, limits, 16)
    assert win.num_blocks == windowed_need(groups[1], limits, 16) == 4 * 34 + 128
    assert glob.num_bytes + win.num_bytes <= budget < glob.num_bytes + win.num_bytes + glob.bytes_per_block
    one_pool_blocks = budget // 18 - 1
    assert glob.num_blocks > 5.8 * one_pool_blocks
    # too small for that split: every group gets as many blocks as the global one (never the first to run out)
    small = split_budget(groups, 1, 18 * 100, limits, 16)
    assert [b.num_blocks for b in small] == [99, 99]


@pytest.mark.parametrize("layers, expected", [((0, 1, 2, 5), "layers 0-2,5 (window 8)"), ((3,), "layers 3 (window 8)")])
def test_group_description(layers, expected):
    assert KvGroup(layers, 8).describe() == expected
    assert re.fullmatch(r"layers \S+ \(global\)", KvGroup(layers, None).describe())
