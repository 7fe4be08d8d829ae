"""The Triton SwiGLU MLP: gate_up matmul with the activation fused, then the down matmul."""

from __future__ import annotations

from typing import Any

from pllm.compiler.kernels.common import dot_precision, triton_dtype
from pllm.compiler.kernels.kernel import Kernel, Language
from pllm.models.spec import ModelSpec

BLOCK_M_SMALL = 16  # decode-sized batches: the weight read dominates, keep M small
BLOCK_M_LARGE = 64  # prefill-sized batches: many row tiles fill the GPU, so wide N tiles reuse x
BLOCK_N_LARGE = 64
SMALL_M_MAX_TOKENS = 16  # at most this many tokens -> the small-M tiles
BLOCK_N_CHOICES = (128, 64, 32, 16)  # small M: widest N tile that still gives MIN_PROGRAMS tiles
MIN_PROGRAMS = 128  # a decode-sized batch has one row of tiles: its column tiles alone must cover the SMs
BLOCK_K = 64


def render(spec: ModelSpec, dtype: str, block_size: int) -> tuple[dict[str, Any], dict[str, bool]]:
    constants = {
        **triton_dtype(dtype),
        "HIDDEN_SIZE": spec.hidden_size,
        "INTERMEDIATE_SIZE": spec.intermediate_size,
        "SMALL_M_MAX_TOKENS": SMALL_M_MAX_TOKENS,
        "BLOCK_M_SMALL": BLOCK_M_SMALL,
        "GATE_UP_BLOCK_N_SMALL": _block_n(spec.intermediate_size),
        "DOWN_BLOCK_N_SMALL": _block_n(spec.hidden_size),
        "BLOCK_M_LARGE": BLOCK_M_LARGE,
        "BLOCK_N_LARGE": BLOCK_N_LARGE,
        "BLOCK_K": BLOCK_K,
        "DOT_PRECISION": dot_precision(dtype),
        "NUM_WARPS": 4,
        "ACTIVATION": _activation(spec),
    }
    options = {
        # the K loop of gate_up runs over hidden, the one of down over intermediate
        "mask_k_hidden": spec.hidden_size % BLOCK_K != 0,
        "mask_k_intermediate": spec.intermediate_size % BLOCK_K != 0,
        # the epilogue: one option per activation the template has, exactly one set
        **{f"act_{name}": name == constants["ACTIVATION"] for name in ACTIVATIONS},
    }
    return constants, options


ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # the epilogues mlp.py.jinja has


def _activation(spec: ModelSpec) -> str:
    assert spec.hidden_act in ACTIVATIONS, f"no mlp epilogue for {spec.hidden_act!r}"  # the spec validated it
    return spec.hidden_act


def _block_n(num_columns: int) -> int:
    for block_n in BLOCK_N_CHOICES:
        if -(-num_columns // block_n) >= MIN_PROGRAMS:
            return block_n
    return BLOCK_N_CHOICES[-1]


KERNEL = Kernel("mlp", op="mlp", language=Language.TRITON, render=render)
