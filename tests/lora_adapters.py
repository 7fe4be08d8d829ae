"""Random PEFT LoRA adapters for the tiny models, made with peft itself, and their merged Hugging Face reference."""

from __future__ import annotations

from pathlib import Path

import torch

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# three adapters differing in rank, alpha and targets (each with a nonzero B, so each changes the output)
ADAPTERS = {
    "alpha": dict(r=8, lora_alpha=16, target_modules=ALL_MODULES),
    "beta": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "gamma": dict(r=16, lora_alpha=8, target_modules=["o_proj", "gate_proj", "down_proj"], use_rslora=True),
}


def make_adapter(model_dir: Path, out_dir: Path, seed: int, **lora_config) -> Path:
    """A PEFT LoRA adapter of the model at model_dir with random A and B (peft starts B at zero: set it)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora_config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(str(out_dir))  # adapter_config.json + adapter_model.safetensors
    return Path(out_dir)


def merged_model(model_dir: Path, adapter_dir: Path):
    """transformers + peft with the adapter merged into the weights: the reference a LoRA request must equal."""
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model.generation_config.eos_token_id = None  # ignore EOS, as the pllm side does
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids) :].tolist()
