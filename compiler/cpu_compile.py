"""Rendered C++ kernels -> shared libraries for the cpu backend, built at compile time with the machine's compiler."""

from __future__ import annotations

import errno
import os
import platform
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pllm.compiler import kernel_cache
from pllm.compiler.kernels import Language
from pllm.compiler.plan import KernelPlan

# The instruction set each machine type is compiled for: a baseline that servers and laptops of the last decade
# all run (AVX2 + FMA: Haswell and Zen 1 on), so a build made on one machine serves on another. Exactly the
# extensions the runtime checks for: -march=x86-64-v3 would also let the compiler use BMI2 or MOVBE, which a VM
# may mask while it shows AVX2.
CPU_TARGETS = {"x86_64": ("avx2-fma", ["-mavx2", "-mfma"]), "aarch64": ("armv8-a", ["-march=armv8-a"])}
# -fopenmp: the loop over (sequence, KV head) items runs on OpenMP threads. Built by g++ and loaded after torch,
# the library binds to torch's own libgomp (same soname), so the kernel and torch's ops share one thread pool
# (clang++ links its libomp instead: a second pool). So g++ is preferred where both are installed.
# A kernel's own flags, if any, are declared in its module under compiler/kernels/ and come after these.
BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp"]
# A hung compiler's limit, not a slow one's: on a loaded shared machine a kernel's ~1 s of CPU took over 2 minutes
COMPILE_TIMEOUT_S = 600
# A compiler that fails for one of these fails for the disk, not the toolchain: the build must fail then (a build
# that fell back to the PyTorch ops would serve slowly for want of space). Compilers print the C library's
# strerror text for them ("ld: final link failed: No space left on device").
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)


def find_compiler() -> str | None:
    """$CXX if set (a command line: "ccache g++" works), else g++ or clang++ on PATH."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def compile_cpu_kernels(kernel_dir: Path, plan: KernelPlan) -> dict[str, Any]:
    """Compile every rendered .cpp of the plan in kernel_dir into a .so beside it.

    A library compiled before from the same source, compiler and command comes from the kernel cache
    (compiler/kernel_cache.py) instead. Returns the manifest entry: {} when the plan has no cpu kernel (float16),
    {"error": why} when they cannot be built here (the cpu backend then runs its PyTorch attention and says so at
    start-up; raised as an OSError instead where the disk, not the toolchain, failed), else the machine, instruction
    set, compiler, flags and each kernel's library. Same sources and compiler -> identical files (the compiler runs
    in kernel_dir on relative names, without debug info, so no path is embedded).
    """
    kernel_dir = Path(kernel_dir)
    sources = [k for k in plan.kernels if k.language is Language.CPP]
    if not sources:
        return {}
    compiler = find_compiler()
    if compiler is None:
        return {"error": "no C++ compiler found (set $CXX, or install g++ or clang++)"}
    machine = platform.machine()
    isa, arch_flags = CPU_TARGETS.get(machine, ("native-default", []))
    flags = [*BASE_FLAGS, *arch_flags]
    version = _compiler_version(compiler)
    libraries, kernel_flags = {}, {}
    for kernel in sources:
        library = kernel.file_name.removesuffix(".cpp") + ".so"
        tries = [list(kernel.compile_flags)]
        if kernel.fallback_flags:  # a second try without what the toolchain may lack
            tries.append([*kernel.compile_flags, *kernel.fallback_flags])
        for own_flags in tries:
            cmd = [*shlex.split(compiler), *flags, *own_flags, kernel.file_name, "-o", library]
            key = kernel_cache.kernel_key((kernel_dir / kernel.file_name).read_bytes(), version, [machine, *cmd])
            fetched = kernel_cache.fetch(key, kernel_dir / library)
            error = None if fetched else _run_compiler(cmd, kernel_dir)
            if error is None:
                if not fetched:
                    kernel_cache.store(key, kernel_dir / library)
                break
        if error is not None:
            for done in [*libraries.values(), library]:  # the build lists every file it holds: leave none behind
                (kernel_dir / done).unlink(missing_ok=True)
            code = next((code for code in DISK_ERRNOS if os.strerror(code) in error), None)
            if code is not None:
                raise OSError(code, f"{os.strerror(code)} ({compiler}: {error})", str(kernel_dir / library))
            return {"error": f"{compiler} failed on {kernel.file_name}: {error}"}
        libraries[kernel.name] = library
        if own_flags:
            kernel_flags[kernel.name] = own_flags
    return {
        "machine": machine,
        "isa": isa,
        "compiler": version,
        "flags": flags,
        "kernel_flags": kernel_flags,
        "libraries": libraries,
    }


def _run_compiler(cmd: list[str], cwd: Path) -> str | None:
    """None on success, else the last lines the compiler printed."""
    try:
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if result.returncode == 0:
        return None
    return " | ".join((result.stderr or result.stdout).strip().splitlines()[-5:])


def _compiler_version(compiler: str) -> str:
    try:
        result = subprocess.run([*shlex.split(compiler), "--version"], capture_output=True, text=True, check=False,
                                timeout=COMPILE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return compiler  # it will not compile either: _run_compiler says why
    lines = result.stdout.strip().splitlines()
    return lines[0] if lines else compiler
