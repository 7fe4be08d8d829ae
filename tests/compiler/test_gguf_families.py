"""GGUF input beyond llama: tiny qwen3 and gemma3 GGUFs (Q8_0 matrices) compile, and greedy output equals
transformers' reading of the same file."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_gguf import write_tiny_gguf
from tiny_models import make_tiny_model

from pllm import LLM, SamplingParams
from pllm.compiler.build import BuildOptions, build

pytest.importorskip("gguf")

PROMPTS = ["Hello, world!", "Paged attention keeps the KV cache", "Grüße aus Köln. こんにちは", "def main():",
           "The quick brown fox", "a", "numbers 0123456789", "Bonjour le monde."]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def test_qwen3_gguf_matches_transformers(tmp_path):
    import transformers

    # head_dim 128: transformers' GGUF reader ignores qwen3's attention.key_length and takes Qwen3Config's default
    # (128, the head_dim of every released Qwen3), so a file with another head_dim would not load there either.
    model_dir = make_tiny_model(tmp_path / "hf", "qwen3", head_dim=128, num_attention_heads=2, num_key_value_heads=1)
    gguf_path = write_tiny_gguf(model_dir, "qwen3")
    out = build(str(gguf_path), tmp_path / "build", BuildOptions(dtype="float32", progress=False))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), gguf_file=gguf_path.name,
                                                           dtype=torch.float32)
    assert hf.config.model_type == "qwen3" and hf.config.head_dim == 128
    hf.generation_config.eos_token_id = None
    llm = LLM(str(out), backend="cpu", kv_cache_memory=1 << 24)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spec"]["qk_norm"] and "qk_norm" in manifest["kernels"]["kernels"]
    for result in llm.generate(PROMPTS, GREEDY, use_tqdm=False):
        ids = torch.tensor([result.prompt_token_ids])
        ref = hf.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert result.outputs[0].token_ids == ref, result.prompt


def test_gemma3_gguf_matches_transformers(tmp_path):
    """What a GGUF can say of gemma3 (transformers reads no layer types, local RoPE base, query_pre_attn_scalar or
    soft-caps from it, so its defaults hold: every 6th layer global): 6 layers, 5 windowed with a window of 6
    tokens, shorter than most prompts; q/k norms and (1 + w) norms stored as llama.cpp stores them."""
    import transformers

    model_dir = make_tiny_model(tmp_path / "hf", "gemma3_text", num_hidden_layers=6, sliding_window=6,
                                tie_word_embeddings=True)
    gguf_path = write_tiny_gguf(model_dir, "gemma3")
    out = build(str(gguf_path), tmp_path / "build", BuildOptions(dtype="float32", progress=False))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), gguf_file=gguf_path.name,
                                                           dtype=torch.float32)
    assert hf.config.model_type == "gemma3_text" and hf.config.sliding_window == 6
    hf.generation_config.eos_token_id = None
    spec = json.loads((out / "manifest.json").read_text())["spec"]
    assert spec["model_type"] == "gemma3_text" and spec["sliding_layers"] == [0, 1, 2, 3, 4]
    llm = LLM(str(out), backend="cpu", kv_cache_memory=1 << 24)
    for result in llm.generate(PROMPTS, GREEDY, use_tqdm=False):
        ids = torch.tensor([result.prompt_token_ids])
        ref = hf.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert result.outputs[0].token_ids == ref, result.prompt
