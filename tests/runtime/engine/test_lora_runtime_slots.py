"""Adapters installed and removed while the engine runs (what pllm-serve's /v1/load_lora_adapter and
/v1/unload_lora_adapter do on the engine thread): slots, in-place writes, the prefix cache, running requests."""

from __future__ import annotations

import pytest
from lora_adapters import hf_greedy, merged_model

from pllm import LLM, SamplingParams
from pllm.models.lora import LoraError, read_adapter
from pllm.runtime.engine.lora import LoRARequest

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
LONG = "The quick brown fox jumps over the lazy dog. " * 4  # several full blocks: the prefix cache holds them


@pytest.fixture(scope="module")
def refs(tiny_dir, tiny_loras):
    """transformers + peft merged, per adapter: what a request under it must give (as a compile-time one does)."""
    return {name: merged_model(tiny_dir("llama"), path) for name, path in tiny_loras.items()}


def make_llm(tiny_build, max_loras: int = 2) -> LLM:
    return LLM(str(tiny_build("llama")), backend="cpu", kv_cache_memory=1 << 24, max_loras=max_loras)


def install(llm: LLM, name: str, path, request_id: int) -> int:
    """As the server does it: read and checked first (off the engine thread there), then handed to the engine."""
    adapter = read_adapter(name, path, llm.engine.spec)
    return llm.engine.install_lora(LoRARequest(name, request_id, str(path)), adapter)


def greedy(llm: LLM, prompt: str, name: str) -> tuple[list[int], list[int]]:
    out = llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=LoRARequest(name, 99))[0]
    return out.prompt_token_ids, out.outputs[0].token_ids


def test_installed_adapters_match_merged_peft_and_reuse_freed_slots(tiny_build, tiny_loras, refs):
    llm = make_llm(tiny_build)
    assert install(llm, "alpha", tiny_loras["alpha"], 1) == 1
    assert install(llm, "beta", tiny_loras["beta"], 2) == 2
    for name in ("alpha", "beta"):
        ids, got = greedy(llm, "Hello, world!", name)
        assert got == hf_greedy(refs[name], ids, 12), name
    with pytest.raises(LoraError, match="all 2 adapter slots"):
        install(llm, "gamma", tiny_loras["gamma"], 3)
    assert llm.engine.loras.names() == ("alpha", "beta")  # the refusal changed nothing
    with pytest.raises(LoraError, match="has already been loaded"):
        install(llm, "beta", tiny_loras["beta"], 4)
    stacks = llm.engine.runner.model.lora_layers
    assert llm.engine.remove_lora("alpha") == 1
    with pytest.raises(LoraError, match="cannot be found"):
        llm.engine.remove_lora("alpha")
    # beta's weights under a new name fit slot 1's stacks (rank 4 <= 8, q and v stacked): written in place
    assert install(llm, "beta2", tiny_loras["beta"], 5) == 1
    assert llm.engine.runner.model.lora_layers is stacks
    ids, got = greedy(llm, "Hello, world!", "beta2")
    assert got == hf_greedy(refs["beta"], ids, 12)
    assert greedy(llm, "Hello, world!", "beta")[1] == got  # slot 2 untouched by the write
    # gamma (rank 16 > 8) does not fit: everything is restacked, slot 2 keeps serving beta
    llm.engine.remove_lora("beta2")
    assert install(llm, "gamma", tiny_loras["gamma"], 6) == 1
    ids, got = greedy(llm, "Paged attention keeps the KV cache", "gamma")
    assert got == hf_greedy(refs["gamma"], ids, 12)
    ids, got = greedy(llm, "Paged attention keeps the KV cache", "beta")
    assert got == hf_greedy(refs["beta"], ids, 12)


def test_a_removed_adapter_finishes_its_requests_and_holds_its_slot_till_then(tiny_build, tiny_loras, refs):
    llm = make_llm(tiny_build)
    engine = llm.engine
    install(llm, "alpha", tiny_loras["alpha"], 1)
    engine.add_request("r", "Hello, world!", GREEDY, None, LoRARequest("alpha", 1))
    engine.step()
    engine.remove_lora("alpha")
    with pytest.raises(LoraError, match="no path"):  # a new request cannot name it any more
        engine.add_request("r2", "Hi", GREEDY, None, LoRARequest("alpha", 1))
    assert install(llm, "beta", tiny_loras["beta"], 2) == 2  # slot 1 still serves "r"
    with pytest.raises(LoraError, match="all 2 adapter slots"):
        install(llm, "gamma", tiny_loras["gamma"], 3)
    outputs = {}
    while engine.has_unfinished():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    out = outputs["r"]
    assert out.outputs[0].token_ids == hf_greedy(refs["alpha"], out.prompt_token_ids, 12)
    assert install(llm, "gamma", tiny_loras["gamma"], 3) == 1  # "r" is done: slot 1 is free


def test_a_name_loaded_again_does_not_hit_the_old_adapters_prefix_cache(tiny_build, tiny_loras, refs):
    llm = make_llm(tiny_build)
    install(llm, "tenant", tiny_loras["alpha"], 1)
    first = greedy(llm, LONG, "tenant")
    llm.engine.remove_lora("tenant")
    install(llm, "tenant", tiny_loras["beta"], 2)  # the same name, other weights
    hits = llm.engine.kv.num_prefix_hits
    ids, got = greedy(llm, LONG, "tenant")
    assert llm.engine.kv.num_prefix_hits == hits  # the blocks computed under alpha are not reused
    assert got == hf_greedy(refs["beta"], ids, 12) != first[1]
    assert greedy(llm, LONG, "tenant")[1] == got and llm.engine.kv.num_prefix_hits > hits  # its own blocks are
