"""What a GGUF file carries beside transformers' reading of it (compiler/gguf_config.py): RoPE scaling (linear, llama3
from rope_freqs, gemma3's global linear, phi3's longrope) and phi3's partial rotary, each built so that greedy output
equals the ORIGINAL Hugging Face model's; what pllm cannot reproduce is refused naming the key or tensor. And phi3's
fused blocks kept as they are under --quantization gguf (compiler/gguf_blocks.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny_gguf import write_tiny_gguf
from tiny_models import make_tiny_model

from pllm import LLM, SamplingParams
from pllm.compiler.build import BuildOptions, build
from pllm.compiler.quantize import Quantization
from pllm.compiler.source import ModelSourceError

gguf = pytest.importorskip("gguf")

PROMPT_IDS = [[1, 40, 41, 42], [1, *range(60, 80)], [5, 6, 7], [1, *range(100, 150)]]  # the last past 32 tokens
N = 24


def converter_rope_freqs(theta, dim, factor, low, high, original) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf LlamaModel.generate_extra_tensors, as written there."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(rope_factors, dtype=torch.float32)


def write_gguf(model_dir, arch, kv=None, tensors=None, qtype="F32"):
    """The model as llama.cpp writes it, its matrices in `qtype`; `kv(writer)` adds keys, `tensors` more tensors."""
    return write_tiny_gguf(model_dir, arch, matrix_type=qtype, kv=kv, tensors=tensors)


def assert_equals_original(model_dir, path, tmp_path):
    """The fp32 build of `path` generates exactly what the original Hugging Face model does (greedy)."""
    import transformers

    out = build(str(path), tmp_path / "build", BuildOptions(dtype="float32", progress=False))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    llm = LLM(str(out), backend="cpu", kv_cache_memory=1 << 24)
    greedy = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
    for ids, result in zip(PROMPT_IDS, llm.generate([{"prompt_token_ids": i} for i in PROMPT_IDS], greedy,
                                                    use_tqdm=False)):
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, pad_token_id=0)[0, len(ids):]
        assert list(result.outputs[0].token_ids) == ref.tolist(), ids
    return json.loads((out / "manifest.json").read_text())["spec"]


def linear_kv(factor):
    def kv(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    return kv


def test_llama_linear_scaling_is_carried(tmp_path):
    model_dir = make_tiny_model(tmp_path / "hf", "llama", rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                           "rope_theta": 10000.0})
    path = write_gguf(model_dir, "llama", kv=linear_kv(4.0))
    spec = assert_equals_original(model_dir, path, tmp_path)
    assert spec["rope_scaling"]["rope_type"] == "linear" and spec["rope_scaling"]["factor"] == 4.0


@pytest.mark.parametrize(("factor", "original", "in_metadata"), [(8.0, 8192, False), (32.0, 64, True)])
def test_llama3_scaling_is_recovered_from_rope_freqs(tmp_path, factor, original, in_metadata):
    params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": original, "rope_theta": 500000.0}
    model_dir = make_tiny_model(tmp_path / "hf", "llama", rope_parameters=params)
    freqs = converter_rope_freqs(500000.0, 16, factor, 1.0, 4.0, original)
    assert 1.0 < float(freqs.min()) or float(freqs.max()) > 1.0  # the scaling changes some frequencies
    kv = (lambda w: w.add_rope_scaling_orig_ctx_len(original)) if in_metadata else None
    path = write_gguf(model_dir, "llama", kv=kv, tensors={"rope_freqs.weight": freqs.numpy()})
    spec = assert_equals_original(model_dir, path, tmp_path)
    assert spec["rope_scaling"]["rope_type"] == "llama3" and spec["rope_scaling"]["factor"] == factor
    assert spec["rope_scaling"]["original_max_position_embeddings"] == original


def test_rope_freqs_of_no_llama3_parameters_is_refused(tmp_path):
    model_dir = make_tiny_model(tmp_path / "hf", "llama")
    freqs = converter_rope_freqs(10000.0, 16, 8.0, 1.0, 4.0, 8192).numpy()
    freqs[3] = np.nextafter(freqs[3], np.float32(100))  # one ulp off: no exact match
    path = write_gguf(model_dir, "llama", tensors={"rope_freqs.weight": freqs})
    with pytest.raises(ModelSourceError, match=r"model\.gguf: tensor 'rope_freqs\.weight' matches no llama3.*"
                                               r"Hugging Face checkpoint"):
        build(str(path), tmp_path / "build", BuildOptions(dtype="float32", progress=False))


@pytest.mark.parametrize(("key", "named"), [("yarn", r"scaling\.type' \('yarn'\)"),
                                           ("attn_factor", r"scaling\.attn_factor")])
def test_rope_settings_pllm_cannot_build_are_refused(tmp_path, key, named):
    model_dir = make_tiny_model(tmp_path / "hf", "llama")

    def kv(w):
        if key == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        else:
            w.add_rope_scaling_attn_factors(1.25)
    path = write_gguf(model_dir, "llama", kv=kv)
    with pytest.raises(ModelSourceError, match=rf"model\.gguf: key 'llama\.rope\.{named}.*Hugging Face"):
        build(str(path), tmp_path / "build", BuildOptions(dtype="float32", progress=False))


def test_gemma3_global_linear_scaling_is_carried(tmp_path):
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    model_dir = make_tiny_model(tmp_path / "hf", "gemma3_text", num_hidden_layers=6, sliding_window=6,
                                tie_word_embeddings=True, rope_parameters=rope)

    def kv(w):
        linear_kv(8.0)(w)
        w.add_rope_freq_base_swa(10000.0)
    spec = assert_equals_original(model_dir, write_gguf(model_dir, "gemma3", kv=kv), tmp_path)
    assert spec["rope_scaling"]["rope_type"] == "linear" and spec["rope_scaling"]["factor"] == 8.0


def test_phi3_partial_rotary_is_carried(tmp_path):
    model_dir = make_tiny_model(tmp_path / "hf", "phi3", partial_rotary_factor=0.5)
    path = write_gguf(model_dir, "phi3", kv=lambda w: w.add_rope_dimension_count(8))  # of head_dim 16
    assert assert_equals_original(model_dir, path, tmp_path)["partial_rotary_factor"] == 0.5


def test_phi3_longrope_is_carried(tmp_path):
    """Factors that are not float32 values (1.1, ...): the file's float32 ones rotate as transformers' do; the last
    prompt runs past the original length, onto the long factors."""
    short, long = [1.0 + 0.1 * i for i in range(8)], [2.0 + 0.2 * i for i in range(8)]
    params = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short, "long_factor": long,
              "original_max_position_embeddings": 32}
    model_dir = make_tiny_model(tmp_path / "hf", "phi3", max_position_embeddings=512,
                                original_max_position_embeddings=32, rope_parameters=params)

    def kv(w):
        w.add_rope_dimension_count(16)
        w.add_rope_scaling_orig_ctx_len(32)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(512 / 32) / math.log(32)))
    path = write_gguf(model_dir, "phi3", kv=kv, tensors={"rope_factors_long.weight": long,
                                                          "rope_factors_short.weight": short})
    spec = assert_equals_original(model_dir, path, tmp_path)
    assert spec["rope_scaling"]["rope_type"] == "longrope"
    assert spec["rope_scaling"]["original_max_position_embeddings"] == 32


def test_phi3_fused_blocks_are_kept(tmp_path, caplog):
    """phi3's attn_qkv and ffn_up (gate_up) in Q8_0 are kept as they are, as o and down are (each checked, bit for
    bit, against transformers' float reading of the file at compile), and the log says none was dequantised."""
    model_dir = make_tiny_model(tmp_path / "hf", "phi3")
    path = write_gguf(model_dir, "phi3", qtype="Q8_0")
    with caplog.at_level("INFO", logger="pllm"):
        out = build(str(path), tmp_path / "kept", BuildOptions(dtype="float32", progress=False,
                                                               quantization=Quantization.GGUF))
    tensors = json.loads((out / "manifest.json").read_text())["quantization"]["tensors"]
    assert set(tensors) == {f"layers.{i}.{t}" for i in range(2) for t in
                            ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")} | {"lm_head"}
    assert all(tensors[f"layers.0.{t}"]["scheme"] == "int8" for t in ("qkv_proj", "gate_up_proj"))
    assert "do not keep packed" not in caplog.text
    llm = LLM(str(out), backend="cpu", kv_cache_memory=1 << 24)
    result = llm.generate(["Hello, world!"], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                          use_tqdm=False)
    assert len(result[0].outputs[0].token_ids) == 8
