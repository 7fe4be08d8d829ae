"""YaRN stretches the context: max_model_len may reach original_max_position_embeddings * factor (vLLM's derived
limit), where Qwen's recipe leaves max_position_embeddings at the original length; greedy output there equals
transformers', which sets no limit at all."""

import pytest
import torch
import transformers

from pllm import LLM, SamplingParams

YARN = {"max_position_embeddings": 64,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}


def test_yarn_max_model_len_reaches_original_times_factor(tiny_dir, tiny_build):
    build = tiny_build("llama", **YARN)
    llm = LLM(str(build), backend="cpu", kv_cache_memory=1 << 24, max_model_len=256)
    assert llm.engine.max_model_len == 256
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir("llama", **YARN)), dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    prompt = torch.randint(3, hf.config.vocab_size, (90,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 90:].tolist()
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref
    with pytest.raises(ValueError, match="max_model_len=257"):
        LLM(str(build), backend="cpu", kv_cache_memory=1 << 24, max_model_len=257)
