"""pllm-compile --tensor-parallel-size: one weights file per rank holding that rank's slice, kernels for one rank's
heads, the layout in the manifest, and refusals before any work."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from pllm.compiler.build import BuildError, BuildOptions, build
from pllm.compiler.cli import main as compile_main
from pllm.compiler.manifest import open_build


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_each_rank_file_holds_its_own_heads(tiny_build, tiny_tp_build):
    # one KV head, two ranks: the KV head is replicated, each rank holds half the query heads
    whole = _tensors(tiny_build("qwen2", num_key_value_heads=1) / "model.safetensors")
    split = tiny_tp_build("qwen2", 2, num_key_value_heads=1)
    manifest = json.loads((split / "manifest.json").read_text())
    assert manifest["tensor_parallel_size"] == 2
    assert manifest["weights"] == ["model-rank0.safetensors", "model-rank1.safetensors"]
    assert not (split / "model.safetensors").exists()
    ranks = [_tensors(split / f) for f in manifest["weights"]]
    q, kv = 64, 16  # 4 heads of 16, 1 KV head
    for r, shard in enumerate(ranks):
        assert set(shard) == set(whole)
        for name in ("layers.0.qkv_proj", "layers.1.qkv_bias"):
            full = whole[name]
            assert shard[name].equal(full[[*range(r * 32, r * 32 + 32), *range(q, q + 2 * kv)]]), name
        assert shard["layers.0.o_proj"].equal(whole["layers.0.o_proj"][:, r * 32:(r + 1) * 32])
        gate_up = whole["layers.1.gate_up_proj"]
        assert shard["layers.1.gate_up_proj"].equal(gate_up[[*range(r * 64, r * 64 + 64),
                                                             *range(128 + r * 64, 128 + r * 64 + 64)]])
        assert shard["layers.1.down_proj"].equal(whole["layers.1.down_proj"][:, r * 64:(r + 1) * 64])
        assert shard["embed_tokens"].equal(whole["embed_tokens"][r * 200:(r + 1) * 200])
        assert shard["lm_head"].equal(whole["lm_head"][r * 200:(r + 1) * 200])
        assert shard["norm"].equal(whole["norm"])
    kernels = manifest["kernels"]["kernels"]
    assert kernels["decode_attention"]["constants"]["NUM_HEADS"] == 2  # rendered for one rank's heads
    assert kernels["decode_attention"]["constants"]["NUM_KV_HEADS"] == 1
    b = open_build(split)
    assert b.tensor_parallel_size == 2 and b.spec.num_attention_heads == 4 and b.rank_spec.num_attention_heads == 2


def test_bad_split_is_refused_before_anything_is_written(tiny_dir, tmp_path):
    out = tmp_path / "build"
    with pytest.raises(BuildError) as e:
        build(str(tiny_dir("llama")), out, BuildOptions(dtype="float32", progress=False, tensor_parallel_size=3))
    assert "num_attention_heads=4" in str(e.value) and "tensor_parallel_size=3" in str(e.value)
    assert "vocab_size=400" in str(e.value)
    assert not out.exists()


def test_cli_names_the_bad_split(tiny_dir, tmp_path, capsys):
    code = compile_main([str(tiny_dir("llama")), "-o", str(tmp_path / "b"), "--dtype", "float32", "-q",
                         "--tensor-parallel-size", "8"])
    assert code != 0
    assert "num_attention_heads=4" in capsys.readouterr().err


def test_family_without_a_split_layout_is_refused(tiny_dir, tmp_path):
    with pytest.raises(BuildError, match="'phi3' does not run tensor-parallel"):
        build(str(tiny_dir("phi3")), tmp_path / "b", BuildOptions(dtype="float32", progress=False,
                                                                 tensor_parallel_size=2))


def test_lora_cannot_be_packed_into_a_split_build(tiny_dir, tiny_loras, tmp_path):
    name, path = next(iter(tiny_loras.items()))
    options = BuildOptions(dtype="float32", progress=False, tensor_parallel_size=2, loras=((name, str(path)),))
    with pytest.raises(BuildError, match="LoRA adapters cannot be packed"):
        build(str(tiny_dir("llama")), tmp_path / "b", options)
