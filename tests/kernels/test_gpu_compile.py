"""Every rendered kernel compiles for sm_80 and sm_90 (PTX + cubin) on this machine, GPU or not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from pllm.compiler.gpu_compile import compile_kernels, resolve_target, triton_can_target_cuda
from pllm.compiler.kernel_modules import COMPILED_INFO_FILE
from pllm.compiler.plan import make_plan
from pllm.compiler.render import render_plan
from pllm.models.quant import QuantFormat, QuantScheme
from pllm.models.spec import ModelKind, ModelSpec, MoeSpec
from pllm.runtime.backends.triton.triton_ops import compiled_artifacts_status

TARGETS = ("sm_80", "sm_90")  # the two the CLI offers by name
CAN_TARGET_CUDA, WHY_NOT = triton_can_target_cuda()
pytestmark = pytest.mark.skipif(not CAN_TARGET_CUDA, reason=f"local triton cannot target CUDA: {WHY_NOT}")

# SmolLM2-135M's shape in fp16 (head_dim 64, GQA 3, hidden 576), and an fp32 model with head_dim 80 and GQA 4,
# so both the masked and unmasked template branches and both dot precisions (tf32 / ieee) get compiled.
# Both carry a mixture-of-experts block (Qwen3-30B-A3B's 128 experts, top-8, width 768; and 8 experts of a width
# that needs the K mask), so the moe kernel compiles in both precisions too.
SHAPES = {
    "smollm2_fp16": (dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                          head_dim=64, moe=MoeSpec(128, 8, 768, True, True, (0,))), "float16", 16),
    "hd80_fp32": (dict(hidden_size=320, intermediate_size=864, num_attention_heads=4, num_key_value_heads=1,
                       head_dim=80, moe=MoeSpec(8, 2, 200, True, False, (0,))), "float32", 32),
    # q/k norm with partial rotary: head_dim 128 in bf16 (unmasked, rounded as Hugging Face's Qwen3 norm; half the
    # dims rotate), head_dim 80 in fp32 with the (1 + w) offset (masked, weight in fp32; 60 dims rotate, a masked
    # rotary half and pass-through tile)
    "qknorm_partial_hd128_bf16": (dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=128, qk_norm=True, partial_rotary_factor=0.5),
                                  "bfloat16", 16),
    "qknorm_offset_partial_hd80_fp32": (dict(hidden_size=320, intermediate_size=864, num_attention_heads=4,
                                             num_key_value_heads=1, head_dim=80, qk_norm=True, norm_weight_offset=1.0,
                                             partial_rotary_factor=0.75), "float32", 32),
    # an encoder (bert): head_dim 80 and hidden 320 take the masked branches of its two kernels
    "bert_hd80_fp16": (dict(hidden_size=320, intermediate_size=1280, num_attention_heads=4, num_key_value_heads=4,
                            head_dim=80, kind=ModelKind.ENCODER, layer_norm_eps=1e-12), "float16", 16),
    # gemma3-1b's attention shape in bf16 with every gemma option rendered: windowed and global attention
    # variants, the score soft-cap, q/k norms, the (1 + w) norm offset and the tanh-GELU epilogue
    "gemma3_bf16": (dict(hidden_size=1152, intermediate_size=6912, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=256, hidden_act="gelu_pytorch_tanh", norm_weight_offset=1.0, qk_norm=True,
                         sliding_window=512, sliding_layers=(0,), attn_logit_softcapping=50.0), "bfloat16", 16),
    # SmolLM2's dense shape in fp16: the llama wiring without experts, so its plan carries the LoRA kernels
    "smollm2_dense_fp16": (dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                num_key_value_heads=3, head_dim=64), "float16", 16),
}
# kernels only some shapes' plans carry
OPTIONAL_KERNELS = {"qknorm_partial_hd128_bf16": {"qk_norm"}, "qknorm_offset_partial_hd80_fp32": {"qk_norm"},
                    "gemma3_bf16": {"prefill_attention_windowed", "decode_attention_partial_windowed", "qk_norm"}}
MOE_KERNELS = {"moe_gate_up", "moe_down", "moe_sum"}
OPTIONAL_KERNELS.update({"smollm2_fp16": MOE_KERNELS, "hd80_fp32": MOE_KERNELS})
ENCODER_KERNELS = {"layer_norm_residual", "layer_norm_plain", "encoder_attention"}
LORA_KERNELS = {"lora_shrink", "lora_expand"}  # every dense llama-wiring plan (no experts)
for _name in ("qknorm_partial_hd128_bf16", "qknorm_offset_partial_hd80_fp32", "gemma3_bf16", "smollm2_dense_fp16"):
    OPTIONAL_KERNELS[_name] = OPTIONAL_KERNELS.get(_name, set()) | LORA_KERNELS
# quantised builds, in tf32-capable bf16 and in fp32 (ieee dots): the one quant_matmul file compiles every scheme,
# each with fp32 and fp16 scales (INT6 weights, codes of a byte each, run INT8's)
QUANT = {"hd80_fp32": QuantFormat(QuantScheme.INT8, 128), "gemma3_bf16": QuantFormat(QuantScheme.INT4, 32)}
QUANT_KERNELS = {f"quant_matmul_{scheme}_{scales}_scales_{variant}" for scheme in ("int8", "int4", "int4_sym")
                 for scales in ("fp32", "fp16")
                 for variant in ("small_m_split", "small_m", "small_m_bias", "large_m", "large_m_bias")}
QUANT_KERNELS |= {"quant_matmul_split_reduce", "quant_matmul_split_reduce_bias"}
for _name in QUANT:
    OPTIONAL_KERNELS[_name] = OPTIONAL_KERNELS.get(_name, set()) | QUANT_KERNELS


def _spec(fields: dict) -> ModelSpec:
    return ModelSpec(model_type="llama", num_hidden_layers=1, vocab_size=128, rms_norm_eps=1e-5,
                     rope_theta=10000.0, rope_scaling=None, max_position_embeddings=2048, tie_word_embeddings=False,
                     attention_bias=False, torch_dtype="float32", bos_token_id=1, eos_token_ids=(2,), **fields)


@pytest.fixture(scope="module")
def compiled_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Render each shape, then compile it for both targets in child processes, two at a time.

    Child processes: this test process runs Triton interpreted (tests/kernels/conftest.py), and triton.compile
    needs the compiled flavour of Triton's library. A fresh Triton cache per child keeps the timing honest. The
    "again" directory (the same kernels rendered elsewhere) goes through compile_kernels in this process, which
    must notice the interpreted Triton and compile in a child of its own.
    """
    root = tmp_path_factory.mktemp("gpu_compile")
    kernel_dirs = {}
    for name, (fields, dtype, block_size) in SHAPES.items():
        kernel_dirs[name] = root / name
        render_plan(make_plan(_spec(fields), dtype, block_size, QUANT.get(name)), kernel_dirs[name])
    fields, dtype, block_size = SHAPES["smollm2_fp16"]
    kernel_dirs["smollm2_fp16_again"] = root / "elsewhere" / "smollm2_fp16"
    render_plan(make_plan(_spec(fields), dtype, block_size), kernel_dirs["smollm2_fp16_again"])
    jobs = [(kernel_dirs[name], list(TARGETS)) for name in SHAPES]
    code = "import sys; from pathlib import Path; from pllm.compiler.gpu_compile import compile_kernels\n" \
           "for target in sys.argv[2:]: compile_kernels(Path(sys.argv[1]), target)"
    running: list[subprocess.Popen] = []
    for i, (kernel_dir, targets) in enumerate(jobs):
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(root / f"triton_cache_{i}")}
        if len(running) == 2:  # two cores: never more than two compilers at once
            _wait(running.pop(0))
        running.append(subprocess.Popen([sys.executable, "-c", code, str(kernel_dir), *targets], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for child in running:
        _wait(child)
    # in this (interpreted) process: compile_kernels must hand the work to a child process by itself
    previous_cache = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton_cache_again")
    try:
        compile_kernels(kernel_dirs["smollm2_fp16_again"], "sm_90")
    finally:
        if previous_cache is None:
            del os.environ["TRITON_CACHE_DIR"]
        else:
            os.environ["TRITON_CACHE_DIR"] = previous_cache
    return kernel_dirs


def _wait(child: subprocess.Popen) -> None:
    output, _ = child.communicate(timeout=600)
    assert child.returncode == 0, output


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("target", list(TARGETS))
def test_every_kernel_compiles(compiled_dirs, shape, target):
    out_dir = compiled_dirs[shape] / "compiled" / target
    info = json.loads((out_dir / COMPILED_INFO_FILE).read_text())
    assert info["target"] == target and info["triton_version"] == triton.__version__
    expected = {
        "rms_norm_residual", "rms_norm_plain", "rope_kv_write", "decode_attention_partial",
        "decode_attention_reduce", "prefill_attention", "mlp_gate_up_silu_small_m", "mlp_gate_up_silu_large_m",
        "mlp_down_proj_small_m", "mlp_down_proj_large_m",
    }
    if shape.startswith("bert"):  # no KV cache: none of the decoder kernels, only the encoder's own
        expected = ENCODER_KERNELS
    assert set(info["kernels"]) == expected | OPTIONAL_KERNELS.get(shape, set())
    for name, entry in info["kernels"].items():
        ptx = (compiled_dirs[shape] / entry["ptx"]).read_text()
        assert f".target {target}" in ptx, f"{name}: PTX not for {target}"
        assert f".entry {entry['kernel']}" in ptx, f"{name}: PTX lacks its entry point"
        cubin = (compiled_dirs[shape] / entry["cubin"]).read_bytes()
        assert cubin[:4] == b"\x7fELF", f"{name}: cubin is not an ELF image"


def test_same_kernels_compile_to_identical_files(compiled_dirs):
    """Rebuilding gives the same files, even from another directory (no paths in the artifacts)."""
    first = compiled_dirs["smollm2_fp16"] / "compiled" / "sm_90"
    second = compiled_dirs["smollm2_fp16_again"] / "compiled" / "sm_90"
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_runtime_status_matches_only_the_same_gpu_and_triton(compiled_dirs):
    kernel_dir = compiled_dirs["smollm2_fp16"]
    ok, reason = compiled_artifacts_status(kernel_dir, (9, 0), triton.__version__)
    assert ok, reason
    ok, reason = compiled_artifacts_status(kernel_dir, (8, 6), triton.__version__)
    assert not ok and "sm_86" in reason and "sm_80, sm_90" in reason
    ok, reason = compiled_artifacts_status(kernel_dir, (8, 0), "0.0.0")
    assert not ok and "0.0.0" in reason and "using JIT" in reason


def test_unknown_target_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sm_70"):
        resolve_target("sm_70")
    with pytest.raises(ValueError, match="sm_70"):
        compile_kernels(tmp_path, "sm_70")
