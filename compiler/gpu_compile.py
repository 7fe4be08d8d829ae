"""Rendered kernels -> PTX and cubin for a GPU target, on any machine (no GPU needed): `pllm-compile --target`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pllm.compiler.kernel_modules import COMPILED_INFO_FILE, env_var, import_kernel_module

# Ampere (A100; A10/RTX 30xx), Ada (L4/L40), Hopper (H100/H200). The CLI offers sm_80, sm_90 and auto.
TARGETS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}
WARP_SIZE = 32
# Serving never loads these binaries (launches go through Triton's JIT and its cache): the build says so beside them.
PURPOSE = "compile check only: serving JIT-compiles its kernels and never loads these binaries"


class GpuCompileError(ValueError):
    """The kernels cannot be compiled for the requested target; the message says why."""


def resolve_target(target: str) -> str:
    """'sm_80' | 'sm_90' as given; 'auto' -> the local GPU's (and an error without one)."""
    if target == "auto":
        import torch

        if not torch.cuda.is_available():
            raise GpuCompileError("--target auto needs a CUDA GPU on this machine; name one: sm_80 or sm_90")
        major, minor = torch.cuda.get_device_capability()
        target = f"sm_{major}{minor}"
    if target not in TARGETS:
        raise GpuCompileError(f"target {target!r} is not supported (supported: {', '.join(TARGETS)}, auto)")
    return target


def triton_can_target_cuda() -> tuple[bool, str]:
    """Whether this Triton install carries the NVIDIA backend (ptxas included); the reason if not."""
    try:
        from triton.backends import backends
    except ImportError as e:  # pragma: no cover - depends on the install
        return False, f"triton has no backends module ({e})"
    if "nvidia" not in backends:
        return False, f"triton {_triton_version()} has no NVIDIA backend (backends: {', '.join(backends)})"
    return True, ""


def compile_kernels(kernel_dir: Path, target: str, out_dir: Path | None = None) -> dict[str, Any]:
    """Compile every kernel variant of the rendered Triton files in kernel_dir for target; write
    <variant>.ptx/.cubin + compiled.json. This proves the kernels compile for the target; nothing loads the results.

    out_dir defaults to kernel_dir/compiled/<target>. Returns the manifest entry: its purpose, the target, the Triton
    version, and per variant its files (relative to kernel_dir), sha256 of the cubin, warps and shared memory.
    The same rendered kernels and Triton version give byte-identical files.
    """
    from triton.backends.compiler import GPUTarget

    target = resolve_target(target)
    ok, reason = triton_can_target_cuda()
    if not ok:
        raise GpuCompileError(reason)
    kernel_dir = Path(kernel_dir)
    out_dir = kernel_dir / "compiled" / target if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if _triton_imported_interpreted():
        return _compile_in_child(kernel_dir, target, out_dir)
    gpu_target = GPUTarget("cuda", TARGETS[target], WARP_SIZE)

    variants: dict[str, Any] = {}
    with _no_line_info():
        for source in sorted(kernel_dir.glob("*.py")):  # every rendered Triton kernel: the plan wrote these
            variants.update(_compile_file(kernel_dir, source.stem, target, gpu_target, out_dir))
    info = {"purpose": PURPOSE, "target": target, "triton_version": _triton_version(), "kernels": variants}
    (out_dir / COMPILED_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def _compile_file(kernel_dir: Path, file_stem: str, target: str, gpu_target: Any, out_dir: Path) -> dict[str, Any]:
    """Compile every variant one rendered file lists in its aot_variants(); returns their manifest entries."""
    import triton
    from triton.compiler import ASTSource

    # compiled (not interpreted) kernel functions: triton.compile needs their JITFunction
    module = import_kernel_module(kernel_dir / f"{file_stem}.py", interpret=False)
    entries = {}
    for variant in module.aot_variants():
        name = variant["name"]
        source = ASTSource(variant["kernel"], variant["signature"], constexprs=variant["constexprs"])
        try:
            compiled = triton.compile(source, target=gpu_target, options={"num_warps": variant["num_warps"]})
        except Exception as e:
            raise GpuCompileError(f"{kernel_dir / file_stem}.py: {name} failed to compile for {target}: {e}") from e
        cubin = compiled.asm["cubin"]
        (out_dir / f"{name}.ptx").write_text(compiled.asm["ptx"])
        (out_dir / f"{name}.cubin").write_bytes(cubin)
        entries[name] = {
            "file": f"{file_stem}.py",
            "kernel": compiled.metadata.name,
            "ptx": str((out_dir / f"{name}.ptx").relative_to(kernel_dir)),
            "cubin": str((out_dir / f"{name}.cubin").relative_to(kernel_dir)),
            "cubin_sha256": hashlib.sha256(cubin).hexdigest(),
            "num_warps": variant["num_warps"],
            "shared_bytes": compiled.metadata.shared,
        }
    return entries


def _triton_imported_interpreted() -> bool:
    """True when this process already imported Triton under TRITON_INTERPRET=1 (e.g. an interpret-backend test
    run): its library is interpreted for good, and triton.compile needs the compiled flavour."""
    if "triton.language" not in sys.modules:
        return False
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    return not isinstance(tl.sum, JITFunction)


def _compile_in_child(kernel_dir: Path, target: str, out_dir: Path) -> dict[str, Any]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    command = [sys.executable, "-m", "pllm.compiler.gpu_compile", str(kernel_dir), target, str(out_dir)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise GpuCompileError(f"compiling {kernel_dir} for {target} in a child process failed:\n"
                              f"{result.stderr[-4000:]}")
    return json.loads((out_dir / COMPILED_INFO_FILE).read_text())


def _no_line_info() -> contextlib.AbstractContextManager[None]:
    """Compile without debug line info: it embeds the kernel file's absolute path (a build's temporary
    directory), which would make the artifacts differ from build to build."""
    return env_var("TRITON_DISABLE_LINE_INFO", "1")


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":  # the child process of _compile_in_child: kernel_dir target out_dir
    compile_kernels(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
