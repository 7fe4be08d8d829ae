"""The kernel registry: each kernel described once, and every place that builds or binds kernels agrees with it."""

from __future__ import annotations

import dataclasses
import inspect

from pllm.compiler.cli import parse_args
from pllm.compiler.kernels import KERNELS, Language
from pllm.compiler.plan import BLOCK_SIZES, make_plan
from pllm.compiler.render import TEMPLATE_DIR
from pllm.models.quant import QuantFormat, QuantScheme
from pllm.models.spec import ModelKind, MoeSpec
from pllm.runtime.backends.cpu.cpu_kernels import BINDINGS
from pllm.runtime.backends.triton.triton_ops import TritonOps

from .conftest import tiny_spec


def test_each_kernel_has_one_name_and_its_template():
    names = [k.name for k in KERNELS]
    assert len(set(names)) == len(names), names
    for kernel in KERNELS:
        assert (TEMPLATE_DIR / f"{kernel.name}.{kernel.language.suffix}.jinja").is_file(), kernel.name


def test_every_op_a_kernel_implements_is_bound_by_its_backend():
    for kernel in KERNELS:
        if kernel.language is Language.CPP:
            assert kernel.op in BINDINGS, kernel.name
        else:
            assert f'self.kernels["{kernel.op}"]' in inspect.getsource(TritonOps), kernel.name
        assert not kernel.compile_flags or kernel.language is Language.CPP, kernel.name


def test_manifest_records_each_kernels_op_and_language():
    moe = MoeSpec(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
                  round_router_weights=False, sparse_layers=(0,))
    plan = make_plan(tiny_spec(qk_norm=True, moe=moe), "bfloat16", 16)
    entries = plan.to_manifest()["kernels"]
    lora = {"lora_shrink", "lora_expand"}  # adapters are stacked for the dense llama wiring only
    dense_only = lora | {"cpu_decode_step"}  # so is the compiled decode step (no experts)
    # a float build: no kernel reading packed weights
    decoder_kernels = [k for k in KERNELS
                       if ModelKind.DECODER in k.kinds and k.name not in dense_only and not k.quantized]
    assert list(entries) == [k.name for k in decoder_kernels]  # every other one applies to this spec, in order
    dense = make_plan(tiny_spec(), "bfloat16", 16).to_manifest()["kernels"]
    assert "moe" not in dense and dense_only <= set(dense)  # dense: no moe kernel, the LoRA kernels, the step
    packed = make_plan(tiny_spec(), "bfloat16", 16, quant=QuantFormat(QuantScheme.INT4, 32))
    quantized = {k.name for k in KERNELS if k.quantized}
    assert quantized and quantized <= set(packed.to_manifest()["kernels"]) and not quantized & set(dense)
    assert packed.quant == QuantFormat(QuantScheme.INT4, 32)
    for kernel in decoder_kernels:
        assert entries[kernel.name]["op"] == kernel.op
        assert entries[kernel.name]["language"] == kernel.language.value
    assert entries["cpu_rope_kv_write"]["compile_flags"] == ["-ffp-contract=off", "-fno-fast-math"]
    assert plan.op_files(Language.TRITON)["decode_attention"] == "decode_attention.py"
    assert plan.op_files(Language.CPP)["decode_attention"] == "cpu_decode_attention.cpp"


def test_an_encoder_plan_holds_only_the_encoder_kernels():
    """No KV cache: none of the decoder kernels (paged attention, rope + cache write, RMSNorm) in a bert build."""
    spec = dataclasses.replace(tiny_spec(num_key_value_heads=2), kind=ModelKind.ENCODER, layer_norm_eps=1e-12)
    for dtype in ("float32", "bfloat16"):
        plan = make_plan(spec, dtype, 16)
        assert [k.name for k in plan.kernels] == ["layer_norm", "encoder_attention"]
        assert plan.kernel("layer_norm").constants["EPS"] == 1e-12


def test_cli_offers_exactly_the_block_sizes_the_plan_accepts():
    for block_size in BLOCK_SIZES:
        assert parse_args(["--block-size", str(block_size)]).block_size == block_size
        make_plan(tiny_spec(), "float32", block_size)
