"""Tiny random-weight Hugging Face models (llama, qwen2, mistral, qwen3, phi3, mixtral, qwen3_moe, gemma3) with a
small byte-level BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps the KV cache in fixed-size blocks.",
    "Bonjour le monde. Grüße aus Köln. こんにちは世界. 你好，世界!",
    "def main():\n    return 42  # numbers 0123456789",
] * 20


def make_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def make_tiny_model(out_dir: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write config.json, model.safetensors and tokenizer files for a random tiny model; returns out_dir."""
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out_dir)
    vocab_size = len(tokenizer)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if model_type in GEMMA3_TYPES:
        model = _make_gemma3(model_type, common, seed)
        return _save_scaled(model, out_dir)
    config_cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
        "qwen3": transformers.Qwen3Config,
        "phi3": transformers.Phi3Config,
        "mixtral": transformers.MixtralConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
    }[model_type]
    if model_type in ("mistral", "mixtral"):
        common.setdefault("sliding_window", None)
    if model_type == "phi3":
        common.setdefault("pad_token_id", tokenizer.pad_token_id)  # Phi3Config's default (32000) is past the vocab
    config = config_cls(**common)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return _save_scaled(model, out_dir)


def _save_scaled(model, out_dir: Path) -> Path:
    # Random init of this size gives near-uniform logits; a larger scale makes greedy choices decisive.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                # gemma stores the norm weight as an offset from 1
                offset = 0.0 if model.config.model_type in GEMMA3_TYPES else 1.0
                p.copy_(offset + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


GEMMA3_TYPES = ("gemma3_text", "gemma3")
# a vision tower as small as Gemma3Config allows: its weights sit in the checkpoint and must stay out of the build
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                   patch_size=14)


def _make_gemma3(model_type: str, common: dict, seed: int):
    """Gemma3ForCausalLM from Gemma3TextConfig, or Gemma3ForConditionalGeneration (a tiny vision tower beside it)."""
    import transformers

    text = dict(common, head_dim=common["hidden_size"] // common["num_attention_heads"])
    text.pop("rope_theta")
    torch.manual_seed(seed)
    if model_type == "gemma3_text":
        return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**text)).to(torch.float32)
    config = transformers.Gemma3Config(text_config=text, vision_config=TINY_VISION, mm_tokens_per_image=4,
                                       tie_word_embeddings=text["tie_word_embeddings"])
    return transformers.Gemma3ForConditionalGeneration(config).to(torch.float32)
