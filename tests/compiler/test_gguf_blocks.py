"""GGUF blocks kept as they are (compiler/gguf_blocks.py): each kept type's conversion into models/quant.py's layout
dequantises, bit for bit, to what gguf's own dequantiser gives; on the default model's real blocks, and on blocks
gguf's quantiser makes of random tensors for the types that file lacks."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from tiny_gguf import write_tiny_gguf
from tiny_models import make_tiny_model

from pllm import LLM, SamplingParams
from pllm.compiler.build import BuildError, BuildOptions, build
from pllm.compiler.gguf_blocks import unpermute_order, weight_from_blocks
from pllm.compiler.manifest import open_build
from pllm.compiler.quantize import Quantization, quantize_int4_sym
from pllm.compiler.source import ModelSourceError
from pllm.models.quant import QuantScheme, dequantize
from pllm.runtime.worker.loader import load_weights

gguf = pytest.importorskip("gguf")
KEPT = {"Q8_0": QuantScheme.INT8, "Q4_0": QuantScheme.INT4_SYM, "Q4_1": QuantScheme.INT4, "Q4_K": QuantScheme.INT4}


def gguf_dequantize(raw: np.ndarray, type_name: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).astype(np.float32))


BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q4_K": 144}
BLOCK_VALUES = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q4_K": 256}
F16_FIELDS = {"Q8_0": 1, "Q4_0": 1, "Q4_1": 2, "Q4_K": 2}  # leading float16 fields: d (and m or dmin)


@pytest.mark.parametrize("type_name", sorted(KEPT))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_block_bytes_decode_as_gguf_does(type_name, seed):
    """Every byte of every block random (codes, Q4_K's packed 6-bit scales and mins), the float16 fields random
    finite values of any sign and exponent: the layout must reproduce gguf's dequantiser on all of them. (gguf's
    Python quantiser cannot make Q4_K, so random bytes are the Q4_K blocks here.)"""
    rng = np.random.default_rng(seed)
    rows, cols = 16, 512
    blocks = rows * cols // BLOCK_VALUES[type_name]
    raw = rng.integers(0, 256, (blocks, BLOCK_BYTES[type_name]), dtype=np.uint8)
    fields = F16_FIELDS[type_name]
    halves = (rng.standard_normal((blocks, fields)) * 10.0 ** rng.integers(-6, 2, (blocks, fields)))
    raw[:, : 2 * fields] = halves.astype(np.float16).view(np.uint8)
    raw = raw.reshape(rows, -1)
    weight = weight_from_blocks(type_name, raw, (rows, cols))
    assert weight.fmt.scheme is KEPT[type_name] and weight.fmt.group_size == 32
    assert torch.equal(dequantize(weight), gguf_dequantize(raw, type_name))
    # the blocks' own fp16 d (and m) stay fp16, and Q4_0 keeps no mins (its -8 d is implied): the file's bytes per
    # weight; Q4_K's products d * sc of random fields are not all fp16 values, so they stay fp32
    assert weight.scales.dtype == (torch.float32 if type_name == "Q4_K" else torch.float16)
    assert weight.mins is None or weight.mins.dtype == weight.scales.dtype
    assert (weight.mins is None) == (type_name in ("Q8_0", "Q4_0"))


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])  # the types gguf's Python quantiser makes
@pytest.mark.parametrize("seed", [0, 1])
def test_quantised_random_blocks_decode_as_gguf_does(type_name, seed):
    rng = np.random.default_rng(seed)
    rows, cols = 24, 512  # Q4_K's super-blocks are 256 wide
    values = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 2, (rows, 1)) + rng.normal(0, 0.3, (rows, 1)))
    raw = gguf.quants.quantize(values.astype(np.float32), gguf.GGMLQuantizationType[type_name])
    weight = weight_from_blocks(type_name, raw, (rows, cols))
    assert weight.fmt.scheme is KEPT[type_name] and weight.fmt.group_size == 32
    assert torch.equal(dequantize(weight), gguf_dequantize(raw, type_name))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int4_sym_quantises_as_q4_0(seed):
    """pllm's own symmetric INT4 at group 32 (compiler.quantize.quantize_int4_sym) is llama.cpp's Q4_0: from the
    same float weights, the codes and fp16 scales of gguf's Q4_0 quantiser, bit for bit (all-zero groups, exact
    halves and ties included)."""
    rng = np.random.default_rng(seed)
    rows, cols = 24, 512
    values = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 2, (rows, 1))).astype(np.float32)
    values[0, :32] = 0  # an all-zero group
    values[1, :32] = np.arange(-16, 16) / 2  # codes on exact halves (trunc(x + 8.5) breaks the ties upwards)
    raw = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q4_0)
    ours = quantize_int4_sym(torch.from_numpy(values), 32)
    theirs = weight_from_blocks("Q4_0", raw, (rows, cols))
    assert ours.fmt == theirs.fmt and ours.scales.dtype == torch.float16
    assert torch.equal(ours.codes, theirs.codes) and torch.equal(ours.scales, theirs.scales)


def test_other_types_are_not_kept():
    raw = np.zeros((2, 210), np.uint8)  # two Q6_K super-blocks' bytes
    assert weight_from_blocks("Q6_K", raw, (2, 256)) is None


def test_default_model_real_blocks_decode_as_gguf_does():
    """SmolLM2-135M-Instruct.Q4_1.gguf: its Q4_1 layer matrices and its Q8_0 embedding (first rows)."""
    from pllm.compiler.source import ModelSourceError, default_gguf_path

    try:
        path = default_gguf_path()
    except ModelSourceError as e:
        pytest.skip(str(e))
    reader = gguf.GGUFReader(str(path))
    seen = set()
    for t in reader.tensors:
        if len(t.shape) != 2 or not (t.name.startswith(("blk.0.", "blk.29.")) or t.name == "token_embd.weight"):
            continue
        raw = t.data[:2048]
        shape = (raw.shape[0], int(t.shape[0]))
        weight = weight_from_blocks(t.tensor_type.name, raw, shape)
        assert torch.equal(dequantize(weight), gguf_dequantize(raw, t.tensor_type.name).reshape(shape)), t.name
        assert weight.scales.dtype == torch.float16, t.name  # kept at the file's size: Q4_1 5 bits, Q8_0 8.5
        seen.add(t.tensor_type.name)
    assert seen == {"Q4_1", "Q8_0"}


def test_unpermute_order_is_transformers_reverse_permutation():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(48 * 3, dtype=np.float32).reshape(48, 3)
    want = LlamaTensorProcessor(config={})._reverse_permute_weights(w, 4, 4)
    assert np.array_equal(w[unpermute_order(48, 4).numpy()], want)


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_build_keeps_blocks_losslessly(tmp_path, tied):
    """A tiny qwen3 GGUF (Q8_0 matrices): --quantization gguf keeps every layer matrix and the LM head (output.weight,
    or token_embd.weight when tied) as INT8 group 32 whose dequantised values are exactly the float build's weights
    and, for the head, gguf's own dequantiser's; the embedding stays float; the build serves."""
    model_dir = make_tiny_model(tmp_path / "hf", "qwen3", head_dim=128, num_attention_heads=2, num_key_value_heads=1,
                                tie_word_embeddings=tied)
    path = write_tiny_gguf(model_dir, "qwen3")
    kept = build(str(path), tmp_path / "kept", BuildOptions(dtype="float32", progress=False,
                                                            quantization=Quantization.GGUF))
    plain = build(str(path), tmp_path / "plain", BuildOptions(dtype="float32", progress=False))
    manifest = json.loads((kept / "manifest.json").read_text())
    assert manifest["quantization"]["method"] == "gguf" and manifest["quantization"]["lm_head"] == "int8"
    assert set(manifest["quantization"]["tensors"]) == {f"layers.{i}.{t}" for i in range(2) for t in
                                                        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")} | {
                                                           "lm_head"}
    float_weights = load_weights(open_build(plain))
    weights = load_weights(open_build(kept))
    head_name = "token_embd.weight" if tied else "output.weight"
    (tensor,) = [t for t in gguf.GGUFReader(str(path)).tensors if t.name == head_name]
    assert tensor.tensor_type.name == "Q8_0"
    head = weights["lm_head"]
    assert torch.equal(dequantize(head), gguf_dequantize(tensor.data, "Q8_0").reshape(head.shape))
    for name, weight in weights.items():
        if name in manifest["quantization"]["tensors"]:
            assert weight.fmt.scheme is QuantScheme.INT8 and weight.fmt.group_size == 32
            assert torch.equal(dequantize(weight), float_weights["embed_tokens" if tied and name == "lm_head"
                                                                else name]), name
        else:
            assert torch.equal(weight, float_weights[name]), name
    llm = LLM(str(kept), backend="cpu", kv_cache_memory=1 << 24)
    out = llm.generate(["Hello, world!"], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8


def test_gguf_build_keeps_q4_0_symmetric_and_joins_it_with_q4_1(tmp_path, caplog):
    """Q4_0 matrices are kept as INT4_SYM (no mins: the file's 18 bytes a block); a fused matrix whose parts mix
    Q4_0 and Q4_1 (q and k Q4_0, v Q4_1) is kept as INT4 with the Q4_0 parts' mins, -8 d, stored. Either way the
    values are exactly the float build's, and the build serves through the compiled step."""
    model_dir = make_tiny_model(tmp_path / "hf", "qwen3", head_dim=128, num_attention_heads=2, num_key_value_heads=1)
    path = write_tiny_gguf(model_dir, "qwen3", matrix_types={"attn_v": "Q4_1", "blk": "Q4_0"})
    kept = build(str(path), tmp_path / "kept", BuildOptions(dtype="float32", progress=False,
                                                            quantization=Quantization.GGUF))
    float_weights = load_weights(open_build(build(str(path), tmp_path / "plain",
                                                  BuildOptions(dtype="float32", progress=False))))
    manifest = json.loads((kept / "manifest.json").read_text())
    weights = load_weights(open_build(kept))
    for i in range(2):
        assert weights[f"layers.{i}.qkv_proj"].fmt.scheme is QuantScheme.INT4
        for name in ("o_proj", "gate_up_proj", "down_proj"):
            weight = weights[f"layers.{i}.{name}"]
            assert weight.fmt.scheme is QuantScheme.INT4_SYM and weight.mins is None
            assert manifest["quantization"]["tensors"][f"layers.{i}.{name}"]["scheme"] == "int4_sym"
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            assert torch.equal(dequantize(weights[f"layers.{i}.{name}"]), float_weights[f"layers.{i}.{name}"])
    with caplog.at_level("INFO", logger="pllm"):
        llm = LLM(str(kept), backend="cpu", kv_cache_memory=1 << 24)
    # (repacked into panels of 16 rows, every one of them alike, where the CPU has AVX512-VNNI)
    assert re.search(r"compiled, reading packed weights \(linears: 2 int4 group 32( in panels)?, "
                     r"6 int4_sym group 32\1\)", caplog.text)
    out = llm.generate(["Hello, world!"], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8


def test_gguf_head_in_another_type_is_quantised_from_its_float_values(tmp_path, caplog):
    """An output matrix the file holds in a type pllm does not keep (F32 here, Q6_K in llama.cpp's 4-bit files):
    --quantization gguf packs it as int8 and int4 do, from the float values, and says so."""
    from pllm.compiler.quantize import quantize_int8

    model_dir = make_tiny_model(tmp_path / "hf", "qwen3", head_dim=128, num_attention_heads=2, num_key_value_heads=1)
    path = write_tiny_gguf(model_dir, "qwen3", float_matrices=("output.weight",))
    with caplog.at_level("INFO", logger="pllm"):
        kept = build(str(path), tmp_path / "kept", BuildOptions(dtype="float32", progress=False,
                                                                quantization=Quantization.GGUF))
    assert "'lm_head.weight' is F32 in the file, quantised from its float values" in caplog.text
    plain = load_weights(open_build(build(str(path), tmp_path / "plain", BuildOptions(dtype="float32",
                                                                                      progress=False))))
    head, expect = load_weights(open_build(kept))["lm_head"], quantize_int8(plain["lm_head"], 32)
    assert torch.equal(head.codes, expect.codes) and torch.equal(head.scales, expect.scales)


def test_gguf_keep_refuses_a_safetensors_model(tiny_dir, tmp_path):
    with pytest.raises(BuildError, match="not a .gguf file"):
        build(str(tiny_dir("llama")), tmp_path / "b", BuildOptions(progress=False, quantization=Quantization.GGUF))


@pytest.mark.parametrize("quantization", [None, Quantization.GGUF])
@pytest.mark.parametrize("bits", [0x7C00, 0x7E00], ids=["inf", "nan"])
def test_a_block_scale_that_is_not_finite_is_refused_naming_the_file(tmp_path, bits, quantization):
    """A Q8_0 block whose fp16 scale is +inf or NaN in the file: refused with or without its blocks kept (an inf
    dequantises to itself, so the kept blocks' equality check alone let it through), the message naming the
    .gguf file once and the tensor, and no build left."""
    model_dir = make_tiny_model(tmp_path / "hf", "qwen3", head_dim=128, num_attention_heads=2, num_key_value_heads=1)
    path = write_tiny_gguf(model_dir, "qwen3")
    (tensor,) = [t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_down.weight"]
    assert tensor.tensor_type.name == "Q8_0"
    with open(path, "r+b") as f:  # the tensor's first block: its fp16 scale, then 32 codes
        f.seek(tensor.data_offset)
        f.write(np.array([bits], dtype=np.uint16).tobytes())
    out = tmp_path / "out"
    with pytest.raises((BuildError, ModelSourceError)) as err:
        build(str(path), out, BuildOptions(dtype="float32", progress=False, quantization=quantization))
    assert str(err.value).startswith(f"{path}: tensor 'model.layers.0.mlp.down_proj.weight' holds NaN or infinite")
    assert not out.exists()
