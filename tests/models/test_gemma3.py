"""gemma3: greedy output equals transformers' in fp32 with every quirk on, batched, chunked, preempted, cached."""

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

from pllm import LLM, SamplingParams
from pllm.compiler.manifest import WEIGHTS_FILE

from .test_hf_equivalence import hf_greedy

MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
PROMPTS = [
    "Hello, world!",
    "Paged attention keeps the KV cache",
    "Grüße aus Köln. こんにちは",
    "def main():",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog again and again.",
    "Bonjour le monde.",
    "numbers 0123456789 and more numbers 9876543210",
    "return 42  # the answer",
]
# The quirks, switched on: a window (6) shorter than every prompt but one, windowed and global layers mixed, a score
# soft-cap small enough to bend the scores, a final-logit soft-cap, an attention scale from query_pre_attn_scalar.
# (rope_local_base_freq stays transformers' 10k against the global 1M: two RoPE tables in play.)
QUIRKS = dict(
    num_hidden_layers=3,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    sliding_window=6,
    attn_logit_softcapping=1.5,
    final_logit_softcapping=3.0,
    query_pre_attn_scalar=24,
    tie_word_embeddings=True,
)
# k and v, 3 layers, 16 tokens, 2 KV heads, head_dim 16, fp32: one KV-cache block of the tiny model
KV_BLOCK_BYTES = 2 * 3 * 16 * 2 * 16 * 4
SOFTCAPPED = "pllm_softcapped_eager"


def _softcapped_eager(module, *args, **kwargs):
    # transformers' own eager attention with the config's soft-cap: Gemma3Attention (5.x) reads
    # attn_logit_softcapping from the config but does not pass it on, so the reference passes it here
    return eager_attention_forward(module, *args, softcap=module.attn_logit_softcapping, **kwargs)


AttentionInterface.register(SOFTCAPPED, _softcapped_eager)
AttentionMaskInterface.register(SOFTCAPPED, eager_mask)


@pytest.fixture(scope="module", params=["gemma3_text", "gemma3"])
def gemma3(request, tiny_dir, tiny_build):
    """(model_type, build, transformers model, reference tokens per prompt) for each checkpoint kind."""
    model_type = request.param
    hf_class = transformers.Gemma3ForCausalLM if model_type == "gemma3_text" else \
        transformers.Gemma3ForConditionalGeneration
    hf = hf_class.from_pretrained(str(tiny_dir(model_type, **QUIRKS)), dtype=torch.float32,
                                  attn_implementation=SOFTCAPPED)
    build = tiny_build(model_type, **QUIRKS)
    prompt_ids = LLM(str(build), backend="cpu").tokenizer(PROMPTS)["input_ids"]
    refs = [hf_greedy(hf, ids, MAX_TOKENS) for ids in prompt_ids]
    return model_type, build, hf, refs


def test_cpu_matches_transformers_batched_chunked_preempted(gemma3):
    """All 8 prompts in one batch, prefilled 16 tokens a step, through a KV cache of 8 blocks: preemption."""
    _, build, _, refs = gemma3
    llm = LLM(str(build), backend="cpu", kv_cache_memory=8 * KV_BLOCK_BYTES, max_num_batched_tokens=16)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert max(len(out.prompt_token_ids) for out in outs) > 2 * QUIRKS["sliding_window"]
    for out, ref in zip(outs, refs):
        assert out.outputs[0].token_ids == ref, out.prompt
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_cpu_matches_transformers_alone_and_from_the_prefix_cache(gemma3):
    """One request at a time (no batching), then the long prompt again: same tokens. Prefix caching is off for a
    model with windowed layers (their blocks leave the cache as the window passes), so nothing is served from it."""
    _, build, _, refs = gemma3
    llm = LLM(str(build), backend="cpu", kv_cache_memory=1 << 22)
    for prompt, ref in zip(PROMPTS[:3], refs[:3]):
        assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == ref
    long_prompt, long_ref = PROMPTS[4], refs[4]
    again = llm.generate([long_prompt], GREEDY, use_tqdm=False)
    again = llm.generate([long_prompt], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0 and llm.engine.kv.num_prefix_hits == 0
    assert again.outputs[0].token_ids == long_ref


def test_interpret_equals_cpu(gemma3):
    """The rendered Triton kernels (windowed and global attention, soft-cap, q/k norm, GeGLU, (1 + w) norms) under
    the interpreter, batched and chunked: token for token what the cpu backend and transformers give."""
    model_type, build, _, refs = gemma3
    if model_type == "gemma3":
        pytest.skip("the same kernels as gemma3_text: the interpreter run is made once, on gemma3_text")
    llm = LLM(str(build), backend="interpret", kv_cache_memory=1 << 22, max_num_batched_tokens=32)
    outs = llm.generate(PROMPTS[2:6], GREEDY, use_tqdm=False)  # 4 of the 8: the interpreter is slow
    refs = refs[2:6]
    for out, ref in zip(outs, refs):
        assert out.outputs[0].token_ids == ref, out.prompt


def test_final_logit_softcap_bounds_the_logprobs(gemma3):
    """The final soft-cap is applied (it never changes a greedy choice, so the tokens alone cannot show it)."""
    model_type, build, hf, refs = gemma3
    if model_type == "gemma3":
        # transformers' Gemma3ForConditionalGeneration (5.x) never applies final_logit_softcapping, its
        # Gemma3ForCausalLM does; pllm applies what the config says for both, so only the text model is a reference
        pytest.skip("transformers' multimodal Gemma 3 ignores final_logit_softcapping")
    llm = LLM(str(build), backend="cpu", kv_cache_memory=1 << 22)
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=1, logprobs=1), use_tqdm=False)[0]
    ids = torch.tensor([out.prompt_token_ids])
    text_config = hf.config.get_text_config()
    with torch.no_grad():
        expected = torch.log_softmax(hf(ids).logits[0, -1].float(), dim=-1)  # transformers caps the logits
        text_config.final_logit_softcapping = None
        try:
            uncapped = torch.log_softmax(hf(ids).logits[0, -1].float(), dim=-1)
        finally:
            text_config.final_logit_softcapping = QUIRKS["final_logit_softcapping"]
    token = out.outputs[0].token_ids[0]
    assert token == refs[0][0]
    assert abs(float(expected[token] - uncapped[token])) > 1e-2  # the cap matters at this token
    assert out.outputs[0].logprobs[0][token].logprob == pytest.approx(float(expected[token]), abs=1e-4)


def test_multimodal_checkpoint_builds_the_text_model_only(tiny_dir, tiny_build):
    """A Gemma3ForConditionalGeneration checkpoint: its vision tower and projector are in the checkpoint but not in
    the build (the vision side is ignored, never copied)."""
    checkpoint = tiny_dir("gemma3", **QUIRKS)
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        assert any(name.startswith("vision_tower.") for name in f.keys())
    build = tiny_build("gemma3", **QUIRKS)
    with safe_open(str(build / WEIGHTS_FILE), "pt") as f:
        names = list(f.keys())
    assert not any("vision" in name or "multi_modal" in name for name in names)
    spec = json.loads((build / "manifest.json").read_text())["spec"]
    assert spec["model_type"] == "gemma3" and spec["sliding_layers"] == [0, 2] and spec["qk_norm"]
