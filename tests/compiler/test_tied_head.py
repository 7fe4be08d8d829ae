"""A config that ties the LM head while the checkpoint stores one: the stored head wins, as in transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pllm import LLM
from pllm.compiler.build import BuildOptions, build
from pllm.compiler.manifest import open_build
from pllm.compiler.quantize import Quantization, quantize_int8
from pllm.runtime.worker.loader import load_weights

EMBED = "model.embed_tokens.weight"


def said_tied(src, tmp_path, drop_key: bool = False, same_values: bool = False):
    """A copy of an untied model folder whose config claims the tie (or, drop_key, leaves it to the family's
    default); same_values: its stored lm_head set equal to the embedding."""
    model = tmp_path / "model"
    shutil.copytree(src, model)
    cfg = json.loads((model / "config.json").read_text())
    if drop_key:
        del cfg["tie_word_embeddings"]
    else:
        cfg["tie_word_embeddings"] = True
    (model / "config.json").write_text(json.dumps(cfg))
    if same_values:
        tensors = load_file(str(model / "model.safetensors"))
        tensors["lm_head.weight"] = tensors[EMBED].clone()
        save_file(tensors, str(model / "model.safetensors"))
    return model


def head_of(build_dir):
    return LLM(str(build_dir), backend="cpu", kv_cache_memory=1 << 24).engine.runner.model.lm_head


@pytest.mark.parametrize(("model_type", "drop_key"), [("llama", False), ("gemma3_text", True)])
def test_a_stored_head_that_differs_is_used(tiny_dir, tmp_path, model_type, drop_key, caplog):
    """tie_word_embeddings true (llama) or gemma3's default tie, yet lm_head.weight is stored with its own values:
    transformers keeps it apart and its logits read it; so does the build, with a warning naming the key."""
    src = said_tied(tiny_dir(model_type, tie_word_embeddings=False), tmp_path, drop_key)
    out = build(str(src), tmp_path / "b", BuildOptions(dtype="float32", progress=False))
    assert "tie_word_embeddings" in caplog.text and "lm_head.weight" in caplog.text
    assert json.loads((out / "manifest.json").read_text())["spec"]["tie_word_embeddings"] is False
    stored = load_file(str(src / "model.safetensors"))
    assert not torch.equal(stored["lm_head.weight"], stored[EMBED])
    assert torch.equal(head_of(out), stored["lm_head.weight"])


def test_a_stored_head_equal_to_the_embedding_keeps_the_tie(tiny_dir, tmp_path):
    src = said_tied(tiny_dir("llama", tie_word_embeddings=False), tmp_path, same_values=True)
    out = build(str(src), tmp_path / "b", BuildOptions(dtype="float32", progress=False))
    assert json.loads((out / "manifest.json").read_text())["spec"]["tie_word_embeddings"] is True
    assert "lm_head" not in load_file(str(out / "model.safetensors"))


def test_the_packed_head_is_made_from_the_stored_head(tiny_dir, tmp_path):
    """--quantization packs the head from the head transformers reads: the stored lm_head, not the embedding."""
    src = said_tied(tiny_dir("llama", tie_word_embeddings=False), tmp_path)
    out = build(str(src), tmp_path / "b", BuildOptions(dtype="float32", progress=False,
                                                       quantization=Quantization.INT8))
    head = load_weights(open_build(out))["lm_head"]
    expect = quantize_int8(load_file(str(src / "model.safetensors"))["lm_head.weight"], 32)
    assert torch.equal(head.codes, expect.codes) and torch.equal(head.scales, expect.scales)


def test_a_tied_checkpoint_storing_only_the_head_reads_it_as_the_embedding(tiny_dir, tmp_path):
    """Tied, with lm_head.weight stored and no embedding: transformers loads the one weight into both; so does the
    build, and its greedy tokens are transformers'."""
    import transformers

    model = tmp_path / "model"
    shutil.copytree(tiny_dir("llama", tie_word_embeddings=True), model)
    tensors = load_file(str(model / "model.safetensors"))
    tensors["lm_head.weight"] = tensors.pop(EMBED)
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    out = build(str(model), tmp_path / "b", BuildOptions(dtype="float32", progress=False))
    assert json.loads((out / "manifest.json").read_text())["spec"]["tie_word_embeddings"] is True
    assert torch.equal(head_of(out), tensors["lm_head.weight"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    prompt = [1, 5, 9, 22, 7]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    from pllm import SamplingParams

    got = LLM(str(out), backend="cpu", kv_cache_memory=1 << 24).generate(
        [{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].token_ids
    assert list(got) == want
