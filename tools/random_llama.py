"""A llama-shaped Hugging Face folder with random weights and a real tokenizer, for tools/bench_vs_llamacpp.py.

The shape is TinyLlama-1.1B's (22 layers, hidden 2048, GQA 32/4 heads, MLP 5632) with SmolLM2's vocabulary, so
the tokenizer files can come from a pllm build of the default model and llama.cpp's converter recognises its
pre-tokenizer. Weights are drawn straight in bf16 from a seeded generator (no float32 model in memory) and written
as safetensors under the names transformers' LlamaForCausalLM reads; config.json is LlamaConfig.save_pretrained's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
    max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
)  # fmt: skip
INIT_STD = 0.02  # Llama's initializer_range: logits stay O(1)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def make_random_llama(out_dir: Path, tokenizer_dir: Path, shape: dict = LLAMA_1B, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and the tokenizer files of `tokenizer_dir`; returns out_dir."""
    import transformers
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    config = transformers.LlamaConfig(**shape, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2,
                                      architectures=["LlamaForCausalLM"],
                                      dtype="bfloat16")
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in transformers.LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, size in shapes.items():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(size, dtype=torch.bfloat16)
        else:
            weights[name] = (torch.randn(size, generator=generator) * INIT_STD).to(torch.bfloat16)
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(tmp))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, tmp / name)
    tmp.rename(out_dir)
    return out_dir


def num_parameters(shape: dict, vocab_size: int) -> int:
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return n * per_layer + vocab_size * h * (1 if shape["tie_word_embeddings"] else 2) + h
