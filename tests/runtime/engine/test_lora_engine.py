"""Multi-LoRA through the engine: a batch mixing three adapters and the base equals transformers + peft merged."""

from __future__ import annotations

import pytest
import torch
from lora_adapters import hf_greedy, merged_model

from pllm import LLM, SamplingParams
from pllm.models.lora import LoraError
from pllm.runtime.engine.lora import LoRARequest

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = ["Hello, world!", "Paged attention keeps the KV cache", "def main():", "Grüße aus Köln."]


@pytest.fixture(scope="module")
def llm(tiny_build):
    return LLM(str(tiny_build("llama")), backend="cpu", kv_cache_memory=1 << 24)


def test_mixed_batch_matches_merged_peft(llm, tiny_dir, tiny_loras):
    names = [None, *tiny_loras]  # base + alpha, beta, gamma; every prompt under every choice, in one batch
    requests = {name: LoRARequest(name, i + 1, str(tiny_loras[name])) for i, name in enumerate(tiny_loras)}
    prompts = [p for p in PROMPTS for _ in names]
    loras = [requests.get(n) for _ in PROMPTS for n in names]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=loras)
    import transformers

    refs = {None: transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir("llama")), dtype=torch.float32)}
    refs.update({n: merged_model(tiny_dir("llama"), tiny_loras[n]) for n in tiny_loras})
    got = {}
    for out, lora in zip(outs, loras, strict=True):
        name = lora.name if lora else None
        want = hf_greedy(refs[name], out.prompt_token_ids, 12)
        assert out.outputs[0].token_ids == want, (name, out.prompt)
        got.setdefault(out.prompt, set()).add(tuple(out.outputs[0].token_ids))
    assert all(len(v) > 1 for v in got.values()), "the adapters must change the output for the test to mean much"


def test_prefix_cache_keys_on_the_adapter(llm, tiny_loras):
    long = "The quick brown fox jumps over the lazy dog. " * 4  # several full blocks
    alpha = LoRARequest("alpha", 1, str(tiny_loras["alpha"]))
    base_first = llm.generate(long, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    kv = llm.engine.kv
    hits = kv.num_prefix_hits
    under_alpha = llm.generate(long, GREEDY, use_tqdm=False, lora_request=alpha)[0]
    assert kv.num_prefix_hits == hits  # the base model's blocks are not reused under the adapter
    again = llm.generate(long, GREEDY, use_tqdm=False, lora_request=alpha)[0]
    assert kv.num_prefix_hits > hits  # the adapter's own blocks are
    assert again.outputs[0].token_ids == under_alpha.outputs[0].token_ids != base_first


def test_bad_lora_requests_fail_clearly(llm, tiny_loras, tmp_path):
    with pytest.raises(LoraError, match="id 0"):
        LoRARequest("x", 0, "/nowhere")
    with pytest.raises(LoraError, match="name"):
        LoRARequest("bad name/", 1, "/nowhere")
    with pytest.raises(LoraError, match="not a directory"):
        llm.generate("Hi", GREEDY, use_tqdm=False, lora_request=LoRARequest("missing", 7, str(tmp_path / "no")))
    # "alpha" loaded here from its own folder (a no-op after the tests before), so this test holds when run alone
    llm.generate("Hi", GREEDY, use_tqdm=False, lora_request=LoRARequest("alpha", 1, str(tiny_loras["alpha"])))
    with pytest.raises(LoraError, match="already loaded from"):
        llm.generate("Hi", GREEDY, use_tqdm=False, lora_request=LoRARequest("alpha", 1, str(tiny_loras["beta"])))
    with pytest.raises(ValueError, match="LoRA requests for"):
        llm.generate(["a", "b"], GREEDY, use_tqdm=False, lora_request=[None])
    assert llm.engine.num_unfinished_requests() == 0


def test_interpret_backend_mixed_batch_matches_merged_peft(tiny_build, tiny_dir, tiny_loras):
    """The rendered shrink/expand kernels end to end (Triton's interpreter): a smaller mixed batch, same reference."""
    llm = LLM(str(tiny_build("llama")), backend="interpret", kv_cache_memory=1 << 22)
    names = [None, *tiny_loras]
    loras = [LoRARequest(n, i, str(tiny_loras[n])) if n else None for i, n in enumerate(names)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outs = llm.generate(["Hello, world!"] * len(names), params, use_tqdm=False, lora_request=loras)
    import transformers

    for out, name in zip(outs, names, strict=True):
        ref = (merged_model(tiny_dir("llama"), tiny_loras[name]) if name else
               transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir("llama")), dtype=torch.float32))
        assert out.outputs[0].token_ids == hf_greedy(ref, out.prompt_token_ids, 4), name


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_other_llama_wiring_families_match_merged_peft(tiny_dir, tiny_build, tmp_path, model_type):
    """q/k/v biases (qwen2), q/k norms after the adapted projection (qwen3), every layer windowed (mistral)."""
    from lora_adapters import ALL_MODULES, make_adapter

    overrides = {"sliding_window": 6} if model_type == "mistral" else {}
    model_dir = tiny_dir(model_type, **overrides)
    adapter = make_adapter(model_dir, tmp_path / "adapter", 7, r=8, lora_alpha=16, target_modules=ALL_MODULES)
    llm = LLM(str(tiny_build(model_type, **overrides)), backend="cpu", kv_cache_memory=1 << 24)
    lora = LoRARequest("one", 1, str(adapter))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = llm.generate(PROMPTS[:2] * 2, params, use_tqdm=False, lora_request=[lora, lora, None, None])
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    merged = merged_model(model_dir, adapter)
    for out, ref in zip(outs, [merged, merged, base, base], strict=True):
        assert out.outputs[0].token_ids == hf_greedy(ref, out.prompt_token_ids, 8)
    assert outs[0].outputs[0].token_ids != outs[2].outputs[0].token_ids


def test_an_adapter_of_some_layers_by_path_matches_merged_peft(tiny_dir, tmp_path, llm):
    """target_modules as full paths naming layer 0 only (peft writes paths for "all-linear" on small models): layer
    1 runs the base weights, as in transformers + peft; LLM.chat takes the adapter as generate does."""
    from lora_adapters import make_adapter

    model_dir = tiny_dir("llama")
    targets = [f"model.layers.0.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
    adapter = make_adapter(model_dir, tmp_path / "adapter", 5, r=8, lora_alpha=16,
                           target_modules=[*targets, "model.layers.0.mlp.down_proj"])
    lora = LoRARequest("layer0", 9, str(adapter))
    outs = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False, lora_request=lora)
    merged = merged_model(model_dir, adapter)
    for out in outs:
        assert out.outputs[0].token_ids == hf_greedy(merged, out.prompt_token_ids, 12)
    conversation = [{"role": "user", "content": PROMPTS[1]}]
    chat = llm.chat(conversation, GREEDY, use_tqdm=False, lora_request=lora)[0]
    assert chat.outputs[0].token_ids == hf_greedy(merged, chat.prompt_token_ids, 12)
    assert chat.outputs[0].token_ids != llm.chat(conversation, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
