"""--dtype auto: bf16 for a CPU with native bf16 arithmetic, fp32 for any other CPU, the checkpoint's dtype for a
GPU; the choice is said at compile time and recorded in the manifest."""

import json

import pytest
import torch

from pllm.compiler.build import BuildError, BuildOptions, build
from pllm.compiler.cli import main as compile_main
from pllm.compiler.dtype_choice import choose_dtype, cpu_flags, host_cpu_flags

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni
bugs\t\t: sysret_ss_attrs
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes sha2 crc32 atomics fphp asimdhp bf16 i8mm
CPU implementer\t: 0x41
"""


def test_cpu_flags_are_read_from_x86_and_arm_cpuinfo():
    assert {"avx512_bf16", "avx2", "avx512bw"} <= cpu_flags(X86_CPUINFO)
    assert {"bf16", "asimd"} <= cpu_flags(ARM_CPUINFO)
    assert cpu_flags("processor\t: 0\n") == frozenset()


@pytest.mark.parametrize(("machine", "flags", "want"), [
    ("x86_64", {"avx2", "avx512f", "avx512bw", "avx512_bf16"}, "bfloat16"),
    ("x86_64", {"avx2", "avx512f", "avx512bw", "amx_tile", "amx_bf16"}, "bfloat16"),
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, "float32"),  # bf16 only by conversion to fp32: no gain
    ("x86_64", {"avx2", "fma"}, "float32"),
    ("aarch64", {"asimd", "bf16"}, "bfloat16"),
    ("aarch64", {"asimd"}, "float32"),
    ("riscv64", {"bf16"}, "float32"),  # a flag of that name means nothing known on another architecture
])
def test_auto_on_a_cpu_takes_bf16_only_with_native_bf16(machine, flags, want):
    choice = choose_dtype("auto", "float32", for_gpu=False, machine=machine, flags=frozenset(flags))
    assert choice.dtype == want
    assert choice.reason.startswith("auto:") and machine in choice.reason or want == "bfloat16"


def test_auto_for_a_gpu_keeps_the_checkpoint_dtype_and_explicit_is_kept():
    bf16_cpu = frozenset({"avx512_bf16"})
    assert choose_dtype("auto", "float16", for_gpu=True, machine="x86_64", flags=bf16_cpu).dtype == "float16"
    for dtype in ("float32", "bfloat16", "float16"):
        choice = choose_dtype(dtype, "float32", for_gpu=False, machine="x86_64", flags=bf16_cpu)
        assert choice.dtype == dtype and "--dtype" in choice.reason
    with pytest.raises(ValueError, match="'int4'"):
        choose_dtype("int4", "float32", for_gpu=False)


def test_build_records_and_says_the_auto_choice(tiny_dir, tmp_path, capsys):
    model = tiny_dir("llama")
    capsys.readouterr()
    assert compile_main([str(model), "-o", str(tmp_path / "out"), "-q"]) == 0
    out = capsys.readouterr()
    want = choose_dtype("auto", "float32", for_gpu=torch.cuda.is_available())
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["dtype"] == want.dtype
    assert f"pllm-compile: dtype {want.dtype} ({want.reason})" in out.out.splitlines()
    assert out.err == ""
    if not torch.cuda.is_available():  # this machine's own flags decide
        assert (want.dtype == "bfloat16") == bool({"avx512_bf16", "amx_bf16", "bf16"} & host_cpu_flags())


def test_an_unknown_dtype_is_a_build_error(tiny_dir, tmp_path):
    with pytest.raises(BuildError, match="--dtype 'int4'"):
        build(str(tiny_dir("llama")), tmp_path / "out", BuildOptions(dtype="int4", progress=False))
