"""ModelSpec + build options -> KernelPlan: every number the kernel templates need, computed in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pllm.models.spec import DTYPES, ModelSpec

# Each rendered module carries the torch dtype name and Triton's pointer type name for AOT signatures.
TRITON_TYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
BLOCK_SIZES = (8, 16, 32, 64, 128)

# Tile choices. They are reasoned defaults for Ampere/Hopper, not tuned results: a tuning pass may replace them
# (the manifest records what each kernel was rendered with).
DECODE_TILE_N = 64  # KV tokens per decode iteration: 64 tokens x 128 dims x 2 bytes = 16 KiB per K or V tile
PREFILL_BLOCK_M = 64  # query rows (tokens x heads of one group) per prefill program
PREFILL_TILE_N = 64  # KV tokens per prefill iteration
MAX_NUM_SPLITS = 16  # flash-decoding: most context splits a decode program group may use
DECODE_TARGET_PROGRAMS = 512  # enough decode programs to fill ~132 SMs about four times over
MIN_DOT_M = 16  # tl.dot needs M >= 16 on tensor cores: decode pads the GQA group up to it
MLP_BLOCK_M_SMALL = 16  # decode-sized batches: the weight read dominates, keep M small
MLP_BLOCK_M_LARGE = 64  # prefill-sized batches: many row tiles fill the GPU, so wide N tiles reuse x
MLP_BLOCK_N_LARGE = 64
MLP_SMALL_M_MAX_TOKENS = 16  # at most this many tokens -> the small-M tiles
MLP_BLOCK_N_CHOICES = (128, 64, 32, 16)  # small M: widest N tile that still gives MLP_MIN_PROGRAMS tiles
MLP_MIN_PROGRAMS = 128  # a decode-sized batch has one row of tiles: its column tiles alone must cover the SMs
MLP_BLOCK_K = 64
CPU_LANES = 8  # fp32 lanes per vector in the cpu kernels: 32 bytes, one AVX2 register or two NEON ones
CPU_PREFETCH_TOKENS = 16  # cpu decode attention requests K/V rows this far ahead: ~2 tiles of compute hide DRAM
CPU_KERNEL_DTYPES = ("float32", "bfloat16")  # widening fp16 needs F16C/NEON intrinsics the templates do not use
CPU_RMS_NORM_PARALLEL_MIN_TOKENS = 64  # fewer rows than this: one thread (waking the others costs more than a row)
CPU_ROPE_PARALLEL_MIN_TOKENS = 16  # the same for RoPE + KV write, which does ~H + KV head rows per token


def next_power_of_2(n: int) -> int:
    assert n >= 1, n
    return 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class KernelSpec:
    """One rendered kernel file: which template, what file name, the numbers and the structural options."""

    name: str  # "rms_norm", also the launcher's name inside the file
    template: str  # "rms_norm.py.jinja"
    file_name: str  # "rms_norm.py" (Triton, imported) or "cpu_decode_attention.cpp" (C++, compiled at build)
    # UPPER_CASE name -> int | float | str | bool; rendered as module-level constants, passed as tl.constexpr.
    # A dict inside a frozen dataclass: the plan is built once by make_plan and never mutated.
    constants: dict[str, Any] = field(hash=False)
    # lower_case name -> bool: what the template's {% if %} blocks read (e.g. whether a dim needs a mask).
    options: dict[str, bool] = field(hash=False)

    def to_manifest(self) -> dict[str, Any]:
        return {
            "file": self.file_name,
            "template": self.template,
            "constants": dict(self.constants),
            "options": dict(self.options),
        }


@dataclass(frozen=True)
class KernelPlan:
    """Every kernel of one model build, in a fixed order (render order, manifest order)."""

    dtype: str  # activation and weight dtype, one of DTYPES
    block_size: int  # KV-cache tokens per block
    kernels: tuple[KernelSpec, ...]

    def kernel(self, name: str) -> KernelSpec:
        for k in self.kernels:
            if k.name == name:
                return k
        raise KeyError(f"no kernel named {name!r} in the plan ({', '.join(k.name for k in self.kernels)})")

    def to_manifest(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "block_size": self.block_size,
            "kernels": {k.name: k.to_manifest() for k in self.kernels},
        }


def make_plan(spec: ModelSpec, dtype: str, block_size: int) -> KernelPlan:
    """Compute every kernel constant for this model, dtype and KV-cache block size."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported (supported: {', '.join(DTYPES)})")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size {block_size} is not supported (supported: {BLOCK_SIZES})")
    common = {"DTYPE": dtype, "TL_DTYPE": TRITON_TYPE_NAMES[dtype]}
    kernels = (
        _rms_norm(spec, common),
        _rope_kv_write(spec, common, block_size),
        _decode_attention(spec, common, block_size),
        _prefill_attention(spec, common, block_size),
        _mlp(spec, common, dtype),
    )
    if cpu_attention_supported(spec, dtype):
        kernels += (_cpu_decode_attention(spec, dtype, block_size),)
    if cpu_rms_norm_supported(spec, dtype):
        kernels += (_cpu_rms_norm(spec),)
    if cpu_rope_supported(spec, dtype):
        kernels += (_cpu_rope_kv_write(spec, dtype),)
    return KernelPlan(dtype=dtype, block_size=block_size, kernels=kernels)


def _kernel(name: str, constants: dict[str, Any], options: dict[str, bool], suffix: str = "py") -> KernelSpec:
    return KernelSpec(name, f"{name}.{suffix}.jinja", f"{name}.{suffix}", constants, options)


def cpu_attention_supported(spec: ModelSpec, dtype: str) -> bool:
    """Whether the plan carries the cpu backend's compiled decode attention (block sizes are all multiples of 8)."""
    return dtype in CPU_KERNEL_DTYPES and spec.head_dim % CPU_LANES == 0


def cpu_rms_norm_supported(spec: ModelSpec, dtype: str) -> bool:
    """bfloat16 only: in float32 the PyTorch RMSNorm stays, bit for bit the one Hugging Face runs."""
    return dtype == "bfloat16" and spec.hidden_size % CPU_LANES == 0


def cpu_rope_supported(spec: ModelSpec, dtype: str) -> bool:
    """Each half of a head row is whole vectors (head_dim 64, 80, 96, 128 all are)."""
    return dtype in CPU_KERNEL_DTYPES and spec.head_dim % (2 * CPU_LANES) == 0


def _head_constants(spec: ModelSpec, common: dict[str, Any]) -> dict[str, Any]:
    return {
        **common,
        "NUM_HEADS": spec.num_attention_heads,
        "NUM_KV_HEADS": spec.num_key_value_heads,
        "GROUP_SIZE": spec.group_size,
        "HEAD_DIM": spec.head_dim,
        "HEAD_DIM_PAD": next_power_of_2(spec.head_dim),
    }


def _rms_norm(spec: ModelSpec, common: dict[str, Any]) -> KernelSpec:
    block_h = next_power_of_2(spec.hidden_size)
    constants = {
        **common,
        "HIDDEN_SIZE": spec.hidden_size,
        "BLOCK_H": block_h,
        "EPS": spec.rms_norm_eps,
        # one row per program: ~8 elements per thread keeps loads vectorised without spilling
        "NUM_WARPS": max(1, min(16, block_h // 256)),
    }
    return _kernel("rms_norm", constants, {"mask_hidden": block_h != spec.hidden_size})


def _rope_kv_write(spec: ModelSpec, common: dict[str, Any], block_size: int) -> KernelSpec:
    half = spec.head_dim // 2
    constants = {
        **_head_constants(spec, common),
        "HALF_DIM": half,
        "HALF_DIM_PAD": next_power_of_2(half),
        "NUM_HEADS_PAD": next_power_of_2(spec.num_attention_heads),
        "NUM_KV_HEADS_PAD": next_power_of_2(spec.num_key_value_heads),
        "BLOCK_SIZE": block_size,
        "NUM_WARPS": 4,
    }
    return _kernel("rope_kv_write", constants, {"mask_half_dim": next_power_of_2(half) != half})


def _decode_attention(spec: ModelSpec, common: dict[str, Any], block_size: int) -> KernelSpec:
    head = _head_constants(spec, common)
    group_pad = max(MIN_DOT_M, next_power_of_2(spec.group_size))
    constants = {
        **head,
        "GROUP_PAD": group_pad,
        "BLOCK_SIZE": block_size,
        "TILE_N": max(DECODE_TILE_N, block_size),
        "MAX_NUM_SPLITS": MAX_NUM_SPLITS,
        "TARGET_PROGRAMS": DECODE_TARGET_PROGRAMS,
        "DOT_PRECISION": _dot_precision(common["DTYPE"]),
        "NUM_WARPS": 4,
        "REDUCE_NUM_WARPS": 1 if head["HEAD_DIM_PAD"] <= 64 else 2,
    }
    options = {"mask_head_dim": head["HEAD_DIM_PAD"] != spec.head_dim}
    return _kernel("decode_attention", constants, options)


def _prefill_attention(spec: ModelSpec, common: dict[str, Any], block_size: int) -> KernelSpec:
    head = _head_constants(spec, common)
    group_pad = next_power_of_2(spec.group_size)
    # a program takes BLOCK_Q query tokens times all GROUP_PAD heads of one KV head: K/V tiles are loaded once
    # for the whole group, and the rows still fill a tensor-core tile
    block_q = max(1, PREFILL_BLOCK_M // group_pad)
    constants = {
        **head,
        "GROUP_PAD": group_pad,
        "BLOCK_Q": block_q,
        "BLOCK_M": block_q * group_pad,
        "BLOCK_SIZE": block_size,
        # head_dim > 128 would need more shared memory per stage than a 64-token tile leaves room for
        "TILE_N": PREFILL_TILE_N if head["HEAD_DIM_PAD"] <= 128 else PREFILL_TILE_N // 2,
        "DOT_PRECISION": _dot_precision(common["DTYPE"]),
        "NUM_WARPS": 4,
    }
    options = {"mask_head_dim": head["HEAD_DIM_PAD"] != spec.head_dim, "mask_group": group_pad != spec.group_size}
    return _kernel("prefill_attention", constants, options)


def _mlp(spec: ModelSpec, common: dict[str, Any], dtype: str) -> KernelSpec:
    constants = {
        **common,
        "HIDDEN_SIZE": spec.hidden_size,
        "INTERMEDIATE_SIZE": spec.intermediate_size,
        "SMALL_M_MAX_TOKENS": MLP_SMALL_M_MAX_TOKENS,
        "BLOCK_M_SMALL": MLP_BLOCK_M_SMALL,
        "GATE_UP_BLOCK_N_SMALL": _mlp_block_n(spec.intermediate_size),
        "DOWN_BLOCK_N_SMALL": _mlp_block_n(spec.hidden_size),
        "BLOCK_M_LARGE": MLP_BLOCK_M_LARGE,
        "BLOCK_N_LARGE": MLP_BLOCK_N_LARGE,
        "BLOCK_K": MLP_BLOCK_K,
        "DOT_PRECISION": _dot_precision(dtype),
        "NUM_WARPS": 4,
    }
    options = {
        # the K loop of gate_up runs over hidden, the one of down over intermediate
        "mask_k_hidden": spec.hidden_size % MLP_BLOCK_K != 0,
        "mask_k_intermediate": spec.intermediate_size % MLP_BLOCK_K != 0,
    }
    return _kernel("mlp", constants, options)


def _mlp_block_n(num_columns: int) -> int:
    for block_n in MLP_BLOCK_N_CHOICES:
        if -(-num_columns // block_n) >= MLP_MIN_PROGRAMS:
            return block_n
    return MLP_BLOCK_N_CHOICES[-1]


def _dot_precision(dtype: str) -> str:
    # fp32 builds promise greedy equality with Hugging Face in fp32: tf32 dots (10-bit mantissa) would break it
    return "ieee" if dtype == "float32" else "tf32"


def _cpu_decode_attention(spec: ModelSpec, dtype: str, block_size: int) -> KernelSpec:
    constants = {
        "NUM_HEADS": spec.num_attention_heads,
        "NUM_KV_HEADS": spec.num_key_value_heads,
        "GROUP_SIZE": spec.group_size,
        "HEAD_DIM": spec.head_dim,
        "BLOCK_SIZE": block_size,
        "LANES": CPU_LANES,
        "PREFETCH_TOKENS": CPU_PREFETCH_TOKENS,
    }
    return _kernel("cpu_decode_attention", constants, {"bf16_cache": dtype == "bfloat16"}, suffix="cpp")


def _cpu_rms_norm(spec: ModelSpec) -> KernelSpec:
    constants = {
        "HIDDEN_SIZE": spec.hidden_size,
        "EPS": spec.rms_norm_eps,
        "LANES": CPU_LANES,
        "PARALLEL_MIN_TOKENS": CPU_RMS_NORM_PARALLEL_MIN_TOKENS,
    }
    return _kernel("cpu_rms_norm", constants, {}, suffix="cpp")


def _cpu_rope_kv_write(spec: ModelSpec, dtype: str) -> KernelSpec:
    constants = {
        "NUM_HEADS": spec.num_attention_heads,
        "NUM_KV_HEADS": spec.num_key_value_heads,
        "HEAD_DIM": spec.head_dim,
        "HALF_DIM": spec.head_dim // 2,
        "LANES": CPU_LANES,
        "PARALLEL_MIN_TOKENS": CPU_ROPE_PARALLEL_MIN_TOKENS,
    }
    return _kernel("cpu_rope_kv_write", constants, {"bf16": dtype == "bfloat16"}, suffix="cpp")
