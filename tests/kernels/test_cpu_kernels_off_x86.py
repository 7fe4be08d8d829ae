"""The packed-weight kernels compile for the other CPU target (compiler/cpu_compile.py's aarch64, armv8-a): their
x86-64 code sits under `#if defined(__x86_64__)`, and what is outside it must not name what is inside. Checked here
on this machine's compiler by reading the rendered sources as a non-x86 build reads them: the C library's headers
first (they are the machine's own), then __x86_64__ and __AVX2__ taken away before the kernel's code."""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
from pathlib import Path

import pytest

from pllm.compiler.cpu_compile import find_compiler
from pllm.compiler.plan import make_plan
from pllm.compiler.render import render_plan
from pllm.models.quant import QuantFormat, QuantScheme

from .conftest import tiny_spec

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")

OFF_X86 = """#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include <omp.h>
#undef __x86_64__
#undef __AVX2__
"""


@pytest.mark.parametrize("name", ["cpu_quant_linear", "cpu_decode_step"])
def test_the_packed_kernels_compile_off_x86(tmp_path: Path, name: str):
    plan = make_plan(tiny_spec(), "bfloat16", 16, quant=QuantFormat(QuantScheme.INT4, 32))
    render_plan(dataclasses.replace(plan, kernels=(plan.kernel(name),)), tmp_path)
    (tmp_path / "off_x86.h").write_text(OFF_X86)
    cmd = [*shlex.split(find_compiler()), "-std=c++17", "-fopenmp", "-fsyntax-only", "-include", "off_x86.h",
           f"{name}.cpp"]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
