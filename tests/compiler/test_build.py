"""The build directory: layout, manifest with checksums, atomic writes, reproducibility, and clear errors."""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pllm.compiler.build import BuildError, BuildOptions, build
from pllm.compiler.cli import main as compile_main
from pllm.compiler.manifest import FORMAT_VERSION, LOADABLE_FORMATS, BuildDirError, open_build
from pllm.compiler.source import ModelSourceError
from pllm.compiler.spec import ConfigError

OPTS = BuildOptions(progress=False)


def test_manifest_lists_every_file_with_sha256(tiny_build):
    out = tiny_build("llama")
    manifest = json.loads((out / "manifest.json").read_text())
    # a build with no packed int4_sym or int6 tensor keeps format 8, which older runtimes load (compiler/manifest.py)
    assert manifest["format_version"] == LOADABLE_FORMATS[0] == 8 and FORMAT_VERSION == 10
    assert manifest["tensor_parallel_size"] == 1 and manifest["weights"] == ["model.safetensors"]
    assert manifest["dtype"] == "float32" and manifest["block_size"] == 16
    assert set(manifest["versions"]) == {"pllm", "torch", "triton"}
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert all(len(d) == 64 for d in manifest["files"].values())
    assert "model.safetensors" in on_disk and "tokenizer.json" in on_disk
    assert any(f.startswith("kernels/") and f.endswith(".py") for f in on_disk)
    assert manifest["spec"]["num_key_value_heads"] == 2 and manifest["kernels"]


def test_weights_are_fused_in_runtime_layout(tiny_dir, tiny_build):
    weights = load_file(str(tiny_build("qwen2") / "model.safetensors"))
    hf = load_file(str(tiny_dir("qwen2") / "model.safetensors"))
    p = "model.layers.1.self_attn."
    expect = torch.cat([hf[p + "q_proj.weight"], hf[p + "k_proj.weight"], hf[p + "v_proj.weight"]])
    assert torch.equal(weights["layers.1.qkv_proj"], expect)
    assert weights["layers.1.qkv_bias"].shape == (64 + 2 * 32,)
    gate_up = torch.cat([hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]])
    assert torch.equal(weights["layers.0.gate_up_proj"], gate_up)


def test_rebuild_gives_identical_files(tiny_dir, tmp_path):
    a = build(str(tiny_dir("llama")), tmp_path / "a", OPTS)
    b = build(str(tiny_dir("llama")), tmp_path / "b", OPTS)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_dtype_option_casts_weights(tiny_dir, tmp_path):
    out = build(str(tiny_dir("llama")), tmp_path / "bf16", BuildOptions(dtype="bfloat16", progress=False))
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "bfloat16"
    assert load_file(str(out / "model.safetensors"))["layers.0.qkv_proj"].dtype == torch.bfloat16


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_weight_names_tensor_and_leaves_nothing(tiny_dir, tmp_path):
    model = _copy_model(tiny_dir("llama"), tmp_path / "model")
    tensors = load_file(str(model / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(model / "model.safetensors"))
    with pytest.raises(BuildError, match="model.layers.1.mlp.up_proj.weight"):
        build(str(model), tmp_path / "out", OPTS)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary directory left behind


def test_shape_contradicting_config_is_named(tiny_dir, tmp_path):
    model = _copy_model(tiny_dir("llama"), tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BuildError, match=r"gate_proj.weight.*contradicts.*config.json"):
        build(str(model), tmp_path / "out", OPTS)
    assert not (tmp_path / "out").exists()


def test_failed_rebuild_keeps_previous_build(tiny_dir, tmp_path):
    out = build(str(tiny_dir("llama")), tmp_path / "out", OPTS)
    before = (out / "manifest.json").read_bytes()
    model = _copy_model(tiny_dir("llama"), tmp_path / "model")
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))  # not a supported type
    with pytest.raises(ConfigError, match="gpt2"):
        build(str(model), out, OPTS)
    assert (out / "manifest.json").read_bytes() == before


def test_sharded_checkpoint_with_index(tiny_dir, tmp_path):
    model = _copy_model(tiny_dir("llama"), tmp_path / "model")
    tensors = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(model / file))
        weight_map.update({k: file for k in keys})
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded = load_file(str(build(str(model), tmp_path / "out", OPTS) / "model.safetensors"))
    single = load_file(str(build(str(tiny_dir("llama")), tmp_path / "ref", OPTS) / "model.safetensors"))
    assert sharded.keys() == single.keys() and all(torch.equal(sharded[k], single[k]) for k in single)


def test_unknown_hub_id_and_missing_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelSourceError, match="not found in the local Hugging Face cache"):
        build("nobody/no-such-model", tmp_path / "out", OPTS)
    with pytest.raises(ModelSourceError, match="GGUF file not found"):
        build(str(tmp_path / "missing.gguf"), tmp_path / "out", OPTS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="config.json"):
        build(str(tmp_path / "empty"), tmp_path / "out", OPTS)
    assert not (tmp_path / "out").exists()


def test_cli_exit_code_and_message(tiny_dir, tmp_path, capsys):
    assert compile_main([str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "out"), "-q"]) == 1
    assert "nope.gguf" in capsys.readouterr().err
    assert compile_main([str(tiny_dir("llama")), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_refuses_to_overwrite_a_non_build_directory(tiny_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(BuildError, match="not a pllm build directory"):
        build(str(tiny_dir("llama")), tmp_path / "out", OPTS)
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_loader_names_tampered_and_missing_files(tiny_dir, tmp_path):
    out = build(str(tiny_dir("llama")), tmp_path / "out", OPTS)
    open_build(out)
    kernel = next((out / "kernels").glob("*.py"))
    kernel.write_text(kernel.read_text() + "\n# edited\n")
    with pytest.raises(BuildDirError, match=f"{kernel.name}.*sha256"):
        open_build(out)
    kernel.unlink()
    with pytest.raises(BuildDirError, match=f"{kernel.name}.*missing"):
        open_build(out)
    (out / "manifest.json").unlink()
    with pytest.raises(BuildDirError, match="manifest.json"):
        open_build(out)
    with pytest.raises(BuildDirError, match="not found"):
        open_build(tmp_path / "nowhere")


def test_target_stores_gpu_compiled_kernels(tiny_dir, tmp_path):
    out = build(str(tiny_dir("llama")), tmp_path / "out", BuildOptions(target="sm_90", progress=False))
    manifest = json.loads((out / "manifest.json").read_text())
    compiled = manifest["compiled_kernels"]
    assert compiled["target"] == "sm_90" and compiled["kernels"]
    for entry in compiled["kernels"].values():
        cubin = out / "kernels" / "compiled" / "sm_90" / Path(entry["cubin"]).name
        assert cubin.is_file() and cubin.read_bytes()[:4] == b"\x7fELF"
        assert str(cubin.relative_to(out)) in manifest["files"]


def test_hub_id_resolved_from_local_cache_only(tiny_dir, tmp_path, monkeypatch):
    hub = tmp_path / "hf" / "hub"
    snapshot = hub / "models--tiny-org--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dir("llama"), snapshot)
    (hub / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (hub / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    out = build("tiny-org/tiny-llama", tmp_path / "out", OPTS)
    assert json.loads((out / "manifest.json").read_text())["source"] == "tiny-org/tiny-llama"


def test_build_without_a_working_cpp_compiler_still_serves(tiny_dir, tmp_path, monkeypatch, caplog):
    """The cpu kernel is an accelerator, not a requirement: a failed compile is recorded, warned about, and leaves no
    library behind; the build then loads with the cpu backend's PyTorch attention, which says why."""
    from pllm.compiler.manifest import open_build
    from pllm.runtime.backends.cpu.cpu_kernels import choose_cpu_kernels

    for compiler, why in [("false", "false failed on cpu_decode_attention.cpp"), ("/nonexistent/g++", "No such file")]:
        monkeypatch.setenv("CXX", compiler)
        with caplog.at_level("WARNING", logger="pllm"):
            out = build(str(tiny_dir("llama")), tmp_path / "out", OPTS)
        entry = json.loads((out / "manifest.json").read_text())["cpu_kernels"]
        assert why in entry["error"] and why in caplog.text
        assert not list((out / "kernels").glob("*.so")) and (out / "kernels" / "cpu_decode_attention.cpp").is_file()
        choice = choose_cpu_kernels(open_build(out))
        assert choice.attention is None and why in choice.reason


def test_every_file_is_readable_as_the_umask_allows(tiny_dir, tmp_path):
    """A build is often served by another user than the one who compiled it: no file may be owner-only when the
    umask would let others read it (safetensors writes its file 0600)."""
    old = os.umask(0o022)
    try:
        out = build(str(tiny_dir("llama")), tmp_path / "b", BuildOptions(progress=False))
    finally:
        os.umask(old)
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert {f: oct(m) for f, m in modes.items() if m & 0o044 != 0o044} == {}
