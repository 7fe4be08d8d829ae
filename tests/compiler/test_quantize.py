"""pllm-compile --quantization int8|int4: what is packed, how it is stored and loaded, and what is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pllm import LLM, SamplingParams
from pllm.compiler.build import BuildError, BuildOptions, build
from pllm.compiler.cli import main as compile_main
from pllm.compiler.manifest import open_build
from pllm.compiler.quantize import (
    QUANTISERS,
    Quantization,
    quantize_int4,
    quantize_int4_sym,
    quantize_int6,
    quantize_int8,
)
from pllm.models.quant import QuantizedWeight, dequantize, unpack_int4
from pllm.runtime.worker.loader import load_weights

TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@pytest.mark.parametrize("group", [None, 32])  # per output channel (--quantization int8), Q8_0's groups (LM head)
def test_int8_is_within_half_a_step_of_each_group(group):
    w = torch.randn(40, 96) * (0.1 + torch.rand(40, 1)) * (0.1 + torch.rand(1, 96))  # every scale a normal fp16
    q = quantize_int8(w, group)
    size = group or 96
    assert q.fmt.group_size == size and q.scales.shape == (40, 96 // size)
    # groups (Q8_0's layout): the scale rounded to the nearest fp16 and kept so; per channel: fp32, exact
    assert q.scales.dtype == (torch.float16 if group else torch.float32)
    exact = w.abs().view(40, -1, size).amax(-1) / 127
    assert torch.equal(q.scales, exact.half() if group else exact)
    step = q.scales.float().repeat_interleave(size, dim=1)
    assert bool(((dequantize(q) - w).abs() <= step * 0.5 * (1 + 1e-5)).all())


def test_int6_is_within_half_a_step_of_each_group():
    """INT6 (the --lm-head int6 head): scale = max|w| / 31 on fp16's grid, codes -31..31 (6 bits, -32 unused, as
    INT8 leaves -128), each weight within half a step; the largest of each group on the top code."""
    w = torch.randn(40, 96) * (0.1 + torch.rand(40, 1)) * (0.1 + torch.rand(1, 96))
    q = quantize_int6(w, 32)
    assert q.fmt.scheme.value == "int6" and q.codes.dtype == torch.int8 and q.scales.dtype == torch.float16
    assert torch.equal(q.scales, (w.abs().view(40, -1, 32).amax(-1) / 31).half())
    assert int(q.codes.min()) >= -31 and int(q.codes.max()) <= 31
    assert torch.equal(q.codes.view(40, -1, 32).abs().amax(-1), torch.full((40, 3), 31, dtype=torch.int8))
    step = q.scales.float().repeat_interleave(32, dim=1)
    assert bool(((dequantize(q) - w).abs() <= step * 0.5 * (1 + 1e-5)).all())


def test_scales_below_fp16s_normal_range_stay_fp32():
    """One group of tiny weights (scale under 2^-14, where fp16 keeps fewer than 11 bits): the whole matrix keeps
    exact fp32 scales (and int4's mins), so no group loses precision to the narrower dtype."""
    w = torch.randn(8, 64)
    w[3, :32] *= 1e-4
    q8, q4 = quantize_int8(w, 32), quantize_int4(w, 32)
    assert q8.scales.dtype == q4.scales.dtype == q4.mins.dtype == torch.float32
    assert torch.equal(q8.scales, w.abs().view(8, 2, 32).amax(-1) / 127)
    assert quantize_int8(w[4:], 32).scales.dtype == quantize_int4(w[4:], 32).scales.dtype == torch.float16


@pytest.mark.parametrize("tiny", [1e-6, 1e-8])
def test_a_scale_that_rounds_to_fp16_zero_keeps_the_matrix_fp32(tiny):
    """A group whose scale is under fp16's smallest step (it would round to zero, and every weight of the group
    with it): the matrix keeps fp32 scales, as for any scale below fp16's normal range, and the group its values."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(4, 64, generator=g) * 0.05
    w[1, :32] = torch.randn(32, generator=g) * tiny
    for q in (quantize_int8(w, 32), quantize_int4(w, 32), quantize_int4_sym(w, 32)):
        assert q.scales.dtype == torch.float32, q.fmt
        group = dequantize(q)[1, :32]
        assert bool((group != 0).any()), q.fmt
        assert float((group - w[1, :32]).abs().max()) <= float(w[1, :32].abs().max()) / 7, q.fmt


@pytest.mark.parametrize("offset", [0.0, 1.0, 16.0, 300.0])  # groups far from zero: the min's rounding is large
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_is_within_half_a_step_of_each_group(group, offset):
    # seeded: a group whose min falls within fp16's subnormal range of zero (about one run in a few hundred
    # unseeded) rightly keeps the whole matrix in fp32 (test_scales_below_fp16s_normal_range_stay_fp32)
    g = torch.Generator().manual_seed(group * 1000 + int(offset))
    w = torch.randn(16, 256, generator=g) * 0.05 + torch.randn(16, 1, generator=g) + offset
    q = quantize_int4(w, group)
    assert q.scales.shape == q.mins.shape == (16, 256 // group)
    assert q.scales.dtype == q.mins.dtype == torch.float16  # on fp16's grid, the codes taken against it
    step = q.scales.float().repeat_interleave(group, dim=1)
    slack = 2**-22 * w.abs()  # the fp32 roundings of (w - min) / scale and code * scale + min
    assert bool(((dequantize(q) - w).abs() <= step * 0.5 * (1 + 1e-5) + slack).all())


@pytest.mark.parametrize("offset", [0.0, 1.0, 16.0])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_sym_is_within_half_a_step_of_each_group_but_past_its_last_code(group, offset):
    """Symmetric around zero, as Q4_0: the step is |peak| / 8 for the group's largest magnitude, which lands on code
    0 exactly; every weight is within half a step of its value, but those on the side opposite the peak beyond 7.5
    steps (code 15 is the last: 7 steps out), which are within their distance past 7 steps (at most one step)."""
    gen = torch.Generator().manual_seed(group)
    w = torch.randn((16, 256), generator=gen) * 0.05 + torch.randn((16, 1), generator=gen) * 0.1 + offset
    w[0, :group] = torch.linspace(-1, 0.97, group)  # peak -1: a step of 1/8, so 0.97 lies 7.76 steps out
    q = quantize_int4_sym(w, group)
    assert q.mins is None and q.scales.shape == (16, 256 // group) and q.scales.dtype == torch.float16
    scale = q.scales.float().repeat_interleave(group, dim=1)
    steps = w / scale  # in units of the step, signed: the peak's side is -8
    allowed = torch.clamp(steps - 7, min=0.5) * scale.abs()
    slack = 2**-8 * scale.abs() + 2**-22 * w.abs()  # codes taken against the fp32 scale, stored in fp16 (Q4_0's way)
    assert bool(((dequantize(q) - w).abs() <= allowed + slack).all())
    peak = w.view(16, -1, group).abs().argmax(-1)
    codes = unpack_int4(q.codes).view(16, -1, group)
    assert bool((codes.gather(-1, peak[..., None]) == 0).all())
    assert float(steps[0, group - 1]) > 7.5  # the exception is met, not only allowed


def test_int4_groups_that_stay_fp32_keep_exact_scales_and_mins():
    """A matrix with one near-constant group (its scale under fp16's normal range) keeps fp32 for all its groups:
    every min the group's exact least value and every weight within half a step, as before fp16 scales."""
    w = torch.randn(8, 64) * 0.05
    w[2, :32] = 0.3001 + 3e-4 * torch.rand(32)
    q = quantize_int4(w, 32)
    assert q.scales.dtype == q.mins.dtype == torch.float32
    assert torch.equal(q.mins, w.view(8, 2, 32).amin(-1))
    step = q.scales.repeat_interleave(32, dim=1)
    assert bool(((dequantize(q) - w).abs() <= step * 0.5 * (1 + 1e-5) + 1e-7).all())


@pytest.mark.parametrize("quantization", [Quantization.INT8, Quantization.INT4, Quantization.INT4_SYM])
def test_build_stores_packed_layers_and_loader_returns_them(tiny_dir, tmp_path, quantization):
    src = tiny_dir("llama")
    out = build(str(src), tmp_path / "b", BuildOptions(dtype="bfloat16", progress=False, quantization=quantization))
    manifest = json.loads((out / "manifest.json").read_text())
    tensors = manifest["quantization"]["tensors"]
    assert manifest["quantization"]["method"] == quantization.value
    assert set(tensors) == {f"layers.{i}.{t}" for i in range(2) for t in TARGETS} | {"lm_head"}
    assert tensors["lm_head"] == {"scheme": "int8", "group_size": 32} and manifest["quantization"]["lm_head"] == "int8"
    group = {Quantization.INT8: None}.get(quantization, 32)  # the 4-bit methods' default group
    stored = load_file(str(out / "model.safetensors"))
    hf = load_file(str(src / "model.safetensors"))
    assert stored["embed_tokens"].dtype == torch.bfloat16 and "layers.0.qkv_proj" not in stored
    weights = load_weights(open_build(out))
    down = weights["layers.1.down_proj"]
    assert isinstance(down, QuantizedWeight)
    expect = QUANTISERS[quantization](hf["model.layers.1.mlp.down_proj.weight"], group)
    assert torch.equal(down.codes, expect.codes) and torch.equal(down.scales, expect.scales)
    assert (down.mins is None) == (quantization is not Quantization.INT4)
    assert manifest["format_version"] == (9 if quantization is Quantization.INT4_SYM else 8)  # 8: older runtimes load
    if quantization is Quantization.INT4_SYM:
        assert "layers.1.down_proj.mins" not in stored and tensors["layers.1.down_proj"]["scheme"] == "int4_sym"
    assert down.fmt == expect.fmt
    assert manifest["kernels"]["kernels"]["cpu_quant_linear"]["op"] == "quant_linear"
    llm = LLM(str(out), backend="cpu", kv_cache_memory=1 << 24)
    result = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert len(result[0].outputs[0].token_ids) == 6


@pytest.mark.parametrize(("options", "message"), [
    (dict(quantization=Quantization.INT4, quant_group_size=48), "48: the model's input widths"),
    (dict(quantization=Quantization.INT4, quant_group_size=33), "even sizes"),
    (dict(quantization=Quantization.INT4, quant_group_size=256), "even sizes"),
    (dict(quantization=Quantization.INT8, quant_group_size=32), "int4 and int4_sym only"),
    (dict(quantization=Quantization.INT4_SYM, quant_group_size=48), "48: the model's input widths"),
    (dict(quant_group_size=32), "needs --quantization int4"),
])
def test_bad_combinations_are_refused(tiny_dir, tmp_path, options, message):
    with pytest.raises(BuildError, match=message):
        build(str(tiny_dir("llama")), tmp_path / "b", BuildOptions(progress=False, **options))
    assert not (tmp_path / "b").exists()


def test_mixture_of_experts_is_refused(tiny_dir, tmp_path):
    with pytest.raises(BuildError, match="mixture of experts"):
        build(str(tiny_dir("mixtral")), tmp_path / "b", BuildOptions(progress=False, quantization=Quantization.INT8))


def test_cli_quantization_flags(tiny_dir, tmp_path, capsys):
    assert compile_main([str(tiny_dir("llama")), "-o", str(tmp_path / "b"), "-q", "--quantization", "int4",
                         "--quant-group-size", "64", "--dtype", "float32"]) == 0
    assert "quantization int4 (group 64)" in capsys.readouterr().out
    assert compile_main([str(tiny_dir("llama")), "-o", str(tmp_path / "c"), "-q", "--quantization", "int4",
                         "--quant-group-size", "48"]) == 1
    assert "--quant-group-size 48: the model's input widths" in capsys.readouterr().err
    # a width the default group does not divide: the message says it was the default, not a flag never given
    assert compile_main([str(tiny_dir("llama", intermediate_size=200)), "-o", str(tmp_path / "d"), "-q",
                         "--quantization", "int4"]) == 1
    err = capsys.readouterr().err
    assert "4-bit groups of 32 (the default): the model's input widths [200]" in err
    assert "--quant-group-size 32" not in err


def test_lora_adapters_serve_on_packed_weights(tiny_dir, tmp_path):
    """An adapter's shrink and expand read activations, not the base weights: a packed build serves it, and its
    output differs from the base model's in the same batch."""
    from lora_adapters import ALL_MODULES, make_adapter

    from pllm import LoRARequest

    src = tiny_dir("llama")
    adapter = make_adapter(src, tmp_path / "adapter", 7, r=8, lora_alpha=16, target_modules=ALL_MODULES)
    out = build(str(src), tmp_path / "b", BuildOptions(dtype="float32", progress=False,
                                                       quantization=Quantization.INT8, loras=(("a", str(adapter)),)))
    llm = LLM(str(out), backend="cpu", kv_cache_memory=1 << 24)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    adapted, base = llm.generate(["hello world"] * 2, params, lora_request=[LoRARequest("a", 1), None],
                                 use_tqdm=False)
    assert len(adapted.outputs[0].token_ids) == 8 and adapted.outputs[0].token_ids != base.outputs[0].token_ids
