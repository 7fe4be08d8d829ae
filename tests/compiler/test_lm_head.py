"""pllm-compile --quantization ... --lm-head int8|int6|float (compiler/lm_head.py): the LM head packed as INT8 (or
INT6) group 32 apart from the float embedding, what the logits compute with it, and --lm-head float giving the float
head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pllm import LLM, SamplingParams
from pllm.compiler.build import BuildError, BuildOptions, build
from pllm.compiler.cli import main as compile_main
from pllm.compiler.lm_head import LmHead
from pllm.compiler.manifest import MANIFEST, MANIFEST_DIGEST_KEY, BuildDirError, manifest_digest, open_build
from pllm.compiler.quantize import Quantization, quantize_int6, quantize_int8
from pllm.models.quant import QuantizedWeight, QuantScheme, dequantize, dequantize_activation, quantize_activation
from pllm.runtime.worker.loader import load_weights

EMBED = "model.embed_tokens.weight"


def quantised_build(src, out, quantization=Quantization.INT4, dtype="float32", **options):
    return build(str(src), out, BuildOptions(dtype=dtype, progress=False, quantization=quantization, **options))


@pytest.mark.parametrize("quantization", [Quantization.INT8, Quantization.INT4])
def test_tied_head_is_packed_apart_and_the_embedding_stays_float(tiny_dir, tmp_path, quantization):
    src = tiny_dir("llama", tie_word_embeddings=True)
    out = quantised_build(src, tmp_path / "b", quantization, dtype="bfloat16")
    hf = load_file(str(src / "model.safetensors"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spec"]["tie_word_embeddings"] is True and manifest["quantization"]["lm_head"] == "int8"
    stored = load_file(str(out / "model.safetensors"))
    assert torch.equal(stored["embed_tokens"], hf[EMBED].to(torch.bfloat16))  # the row gather reads it, bit-equal
    assert {"lm_head.codes", "lm_head.scales"} <= set(stored) and "lm_head.mins" not in stored
    head = load_weights(open_build(out))["lm_head"]
    expect = quantize_int8(hf[EMBED], 32)  # from the source values, not the bf16-rounded embedding
    assert head.fmt.scheme is QuantScheme.INT8 and head.fmt.group_size == 32
    assert torch.equal(head.codes, expect.codes) and torch.equal(head.scales, expect.scales)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_are_the_packed_head_times_the_rounded_activations(tiny_dir, tmp_path, tied):
    """The model's logits read the packed head: dequantize(W) @ the activations rounded per block of 32 (the packed
    rows' meaning, models/quant.py) at every row count (past 64 rows the fp32 GEMM takes them rounded so), to float32
    rounding; not the float head's values."""
    src = tiny_dir("llama", tie_word_embeddings=tied)
    model = LLM(str(quantised_build(src, tmp_path / "b")), backend="cpu", kv_cache_memory=1 << 24).engine.runner.model
    assert isinstance(model.lm_head, QuantizedWeight) and model.lm_head is model.w["lm_head"]
    hf = load_file(str(src / "model.safetensors"))
    float_head = hf[EMBED if tied else "lm_head.weight"]
    w = dequantize(model.lm_head)
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 5, 64, 80):
        hidden = torch.randn((rows, model.spec.hidden_size), generator=gen)
        x = dequantize_activation(*quantize_activation(hidden))
        logits = model.logits(hidden)
        torch.testing.assert_close(logits, F.linear(x, w))
        assert not torch.allclose(logits, F.linear(hidden, float_head), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_lm_head_float_is_the_float_head(tiny_dir, tmp_path, tied):
    """--lm-head float: the head as before (untied: lm_head in the build's dtype; tied: the embedding alone), every
    other tensor as the int8-head build stores it."""
    src = tiny_dir("llama", tie_word_embeddings=tied)
    plain = quantised_build(src, tmp_path / "float", lm_head=LmHead.FLOAT)
    packed = quantised_build(src, tmp_path / "int8")
    manifest = json.loads((plain / "manifest.json").read_text())
    assert manifest["quantization"]["lm_head"] == "float" and "lm_head" not in manifest["quantization"]["tensors"]
    float_stored = load_file(str(plain / "model.safetensors"))
    int8_stored = load_file(str(packed / "model.safetensors"))
    heads = {"lm_head.codes", "lm_head.scales"}
    assert set(int8_stored) - set(float_stored) == heads
    assert set(float_stored) - set(int8_stored) == (set() if tied else {"lm_head"})
    if not tied:
        assert torch.equal(float_stored["lm_head"], load_file(str(src / "model.safetensors"))["lm_head.weight"])
    assert all(torch.equal(float_stored[n], int8_stored[n]) for n in set(float_stored) & set(int8_stored))
    model = LLM(str(plain), backend="cpu", kv_cache_memory=1 << 24).engine.runner.model
    assert model.lm_head is model.w["embed_tokens" if tied else "lm_head"]
    out = LLM(str(packed), backend="cpu", kv_cache_memory=1 << 24).generate(
        ["Hello"], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 6


def test_lm_head_flag_needs_quantization(tiny_dir, tmp_path, capsys):
    with pytest.raises(BuildError, match="--lm-head int8 needs --quantization"):
        build(str(tiny_dir("llama")), tmp_path / "b", BuildOptions(progress=False, lm_head=LmHead.INT8))
    assert compile_main([str(tiny_dir("llama")), "-o", str(tmp_path / "c"), "-q", "--lm-head", "float"]) == 1
    assert "--lm-head float needs --quantization" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert compile_main([str(tiny_dir("llama")), "-o", str(tmp_path / "d"), "-q", "--quantization", "int8",
                         "--lm-head", "float", "--dtype", "float32"]) == 0
    assert "the embedding, LM head and norms in float32" in capsys.readouterr().out


def test_a_hidden_size_off_the_group_keeps_the_head_float(tiny_dir, tmp_path):
    src = tiny_dir("llama", hidden_size=48, num_attention_heads=2, num_key_value_heads=1)
    out = quantised_build(src, tmp_path / "b", Quantization.INT8)
    assert json.loads((out / "manifest.json").read_text())["quantization"]["lm_head"] == "float"
    with pytest.raises(BuildError, match="--lm-head int8: the hidden size 48"):
        quantised_build(src, tmp_path / "c", Quantization.INT8, lm_head=LmHead.INT8)


def _resigned(build, edit) -> None:
    manifest = json.loads((build / MANIFEST).read_text())
    edit(manifest["quantization"])
    manifest[MANIFEST_DIGEST_KEY] = manifest_digest(manifest)
    (build / MANIFEST).write_text(json.dumps(manifest))


def test_manifest_lm_head_key(tiny_dir, tmp_path):
    """Builds from before --lm-head (no key, float head) still load; a key that contradicts the packed tensors is
    refused, naming it."""
    out = quantised_build(tiny_dir("llama"), tmp_path / "b", lm_head=LmHead.FLOAT)
    _resigned(out, lambda q: q.pop("lm_head"))
    assert not isinstance(load_weights(open_build(out))["lm_head"], QuantizedWeight)
    _resigned(out, lambda q: q.update(lm_head="int8"))
    with pytest.raises(BuildDirError, match="quantization.lm_head"):
        open_build(out)


# the families beside llama's that may be quantised (tied or not); mistral and qwen2 are llama's wiring too
@pytest.mark.parametrize("model_type", ["gemma3_text", "phi3", "qwen3"])
def test_every_quantisable_family_reads_the_packed_head(tiny_dir, tmp_path, model_type):
    out = quantised_build(tiny_dir(model_type), tmp_path / "b", Quantization.INT8)
    llm = LLM(str(out), backend="cpu", kv_cache_memory=1 << 24)
    model = llm.engine.runner.model
    assert isinstance(model.lm_head, QuantizedWeight) and model.lm_head is model.w["lm_head"]
    assert not isinstance(model.w["embed_tokens"], QuantizedWeight)
    result = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(result[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("tied", [False, True])
def test_lm_head_int6_is_packed_at_six_bits(tiny_dir, tmp_path, tied):
    """--lm-head int6: the head as INT6 group 32 quantised from the source's values (codes -31..31, fp16 scales), a
    format-10 build (a format-9 runtime's kernels do not know the scheme), whose logits are dequantize(W) times the
    activations rounded per block of 32, as an int8 head's are; it generates."""
    src = tiny_dir("llama", tie_word_embeddings=tied)
    out = quantised_build(src, tmp_path / "b", Quantization.INT4_SYM, dtype="bfloat16", lm_head=LmHead.INT6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 10 and manifest["quantization"]["lm_head"] == "int6"
    assert manifest["quantization"]["tensors"]["lm_head"] == {"scheme": "int6", "group_size": 32}
    hf = load_file(str(src / "model.safetensors"))
    expect = quantize_int6(hf[EMBED if tied else "lm_head.weight"], 32)
    llm = LLM(str(out), backend="cpu", kv_cache_memory=1 << 24)
    model = llm.engine.runner.model
    head = model.lm_head
    assert head.fmt.scheme is QuantScheme.INT6 and head.scales.dtype == torch.float16
    assert torch.equal(head.codes, expect.codes) and torch.equal(head.scales, expect.scales)
    assert int(head.codes.abs().max()) == 31  # each group's largest weight on the top code
    gen = torch.Generator().manual_seed(1)
    for rows in (1, 5, 80):
        hidden = torch.randn((rows, model.spec.hidden_size), generator=gen).bfloat16()
        x = dequantize_activation(*quantize_activation(hidden))
        want = F.linear(x, dequantize(head))
        torch.testing.assert_close(model.logits(hidden), want, rtol=2**-7, atol=2**-7 * float(want.abs().max()))
    result = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert len(result[0].outputs[0].token_ids) == 6


def test_an_int6_head_contradicting_the_manifest_is_refused(tiny_dir, tmp_path):
    """quantization.lm_head must name the packed head's scheme: int6 over an int8-packed head (or the reverse) is a
    damaged manifest, refused naming the key."""
    out = quantised_build(tiny_dir("llama"), tmp_path / "b", Quantization.INT8)
    _resigned(out, lambda q: q.update(lm_head="int6"))
    with pytest.raises(BuildDirError, match="quantization.lm_head"):
        open_build(out)


def test_int6_is_for_the_head_only(tiny_dir, tmp_path):
    """A manifest that marks a layer's weight int6 is refused naming it (the compiler packs only the head so, and
    the compiled decode step reads no INT6 layer); were one to reach the step, it says why it cannot read it
    rather than failing on a missing key."""
    from types import SimpleNamespace

    from pllm.runtime.backends.cpu.cpu_decode_stack import _linear_words

    out = quantised_build(tiny_dir("llama"), tmp_path / "b", Quantization.INT8)
    _resigned(out, lambda q: q["tensors"]["layers.0.qkv_proj"].update(scheme="int6"))
    with pytest.raises(BuildDirError, match="quantization.tensors.layers.0.qkv_proj"):
        open_build(out)
    six = quantize_int6(torch.randn(32, 64), 32)
    why = _linear_words(SimpleNamespace(packed=True, dtype=torch.bfloat16), six, (32, 64))
    assert isinstance(why, str) and "int6" in why


def test_int6_codes_past_six_bits_are_refused_at_load():
    """An int6 tensor holding a code outside -32..31 (a damaged build) is refused by the loader on every CPU and
    shape, not only where the cpu backend makes 6-bit panels of it."""
    from pllm.runtime.worker.loader import gather_quantized

    codes = torch.zeros((3, 96), dtype=torch.int8)  # 3 rows of 96: no panels would be made of it
    codes[1, 7] = 100
    tensors = {"lm_head.codes": codes, "lm_head.scales": torch.ones((3, 3), dtype=torch.float16)}
    with pytest.raises(BuildDirError, match="lm_head' is int6 but holds codes outside -32..31"):
        gather_quantized(tensors, {"lm_head": {"scheme": "int6", "group_size": 32}}, Path("model.safetensors"))
    codes[1, 7] = -32  # the extremes are kept
    gather_quantized(tensors, {"lm_head": {"scheme": "int6", "group_size": 32}}, Path("model.safetensors"))
