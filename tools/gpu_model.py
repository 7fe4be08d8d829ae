"""Random-weight Llama checkpoints for tools/gpu_check.py: a Hugging Face folder with the shapes of a real model.

The weights are drawn on the target device (seconds for 1B parameters on a GPU) and saved as safetensors; the
tokenizer is word-level with one word per id, so every id the model can sample decodes (a trained tokenizer of the
real vocabulary cannot travel to a machine without network access).
"""

from __future__ import annotations

from pathlib import Path

import torch

# meta-llama/Llama-3.2-1B's config.json, the fields a LlamaConfig reads
LLAMA_3_2_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    head_dim=64, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001, hidden_act="silu",
)
# the dry run's stand-in: the same wiring (GQA, llama3 rope scaling, tied embeddings) at toy size
TINY_LLAMA = dict(
    LLAMA_3_2_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    rope_scaling=dict(LLAMA_3_2_1B["rope_scaling"], factor=4.0, original_max_position_embeddings=128),
)
INIT_STD = 0.02  # Llama's initializer_range: logits stay O(1), so sampling sees no NaN or overflow


def word_level_tokenizer(vocab_size: int, bos_id: int, eos_id: int):
    """A fast tokenizer whose vocabulary is the words w0 ... w<vocab_size - 1>, split on whitespace."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f"w{bos_id}", eos_token=f"w{eos_id}",
                                   unk_token="w0", pad_token="w0")


def make_random_llama(out_dir: Path, config: dict, dtype: torch.dtype, device: str, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and the tokenizer of a random Llama with `config`; returns out_dir."""
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config = transformers.LlamaConfig(**config, torch_dtype=str(dtype).removeprefix("torch."))
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_config).to(dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, INIT_STD, generator=generator)
    model.save_pretrained(str(out_dir))
    word_level_tokenizer(config["vocab_size"], config["bos_token_id"], config["eos_token_id"]).save_pretrained(
        str(out_dir))
    return out_dir


def random_prompts(num: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """`num` prompts of `length` token ids drawn from the whole vocabulary but the first 100 (specials live low)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab_size, (num, length), generator=generator).tolist()
