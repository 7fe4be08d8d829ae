"""The Ops of the cuda and interpret backends: rendered Triton kernels imported from a build's kernel dir."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.abc
import importlib.util
import json
import linecache
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import torch

from pllm.runtime.ops import AttentionMetadata

logger = logging.getLogger(__name__)

KERNEL_NAMES = ("rms_norm", "rope_kv_write", "decode_attention", "prefill_attention", "mlp")
COMPILED_INFO_FILE = "compiled.json"  # written by compiler/gpu_compile.py next to each target's artifacts
# kernel-dir-relative name -> the file's bytes, None where there is no such file (a build: verified, listed ones only)
KernelReader = Callable[[str], "bytes | None"]


def dir_reader(kernel_dir: Path) -> KernelReader:
    """Read a plain folder of rendered kernels (a build is read through LoadedBuild.read_kernel instead)."""

    def read(name: str) -> bytes | None:
        f = Path(kernel_dir) / name
        return f.read_bytes() if f.is_file() else None

    return read


@contextlib.contextmanager
def env_var(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the span of a `with` block, then restore it (or remove it again)."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def _triton_interpret(interpret: bool) -> contextlib.AbstractContextManager[None]:
    """Set TRITON_INTERPRET for the span of a kernel module import, then restore it.

    Triton reads the variable when @triton.jit decorates a function (InterpretedFunction vs JITFunction), not
    when it launches one, so the variable only needs to be right while a kernel module's body runs; the rest of
    the process (CPU torch ops included) never sees it. Triton's own library is the exception: see
    ensure_triton_mode.
    """
    return env_var("TRITON_INTERPRET", "1" if interpret else "0")


class TritonModeError(RuntimeError):
    """Triton was already imported in the other mode (interpreted vs compiled) in this process."""


def ensure_triton_mode(interpret: bool) -> None:
    """Import Triton in the requested mode, or fail if this process already imported it in the other one.

    Triton decorates its own library (tl.sum, tl.cdiv, ...) when it is first imported, as interpreted or as
    compiled functions, and an interpreted kernel cannot call a compiled library function (nor the reverse).
    So one process runs Triton one way: the interpret backend (and its tests) import it first with
    TRITON_INTERPRET=1; CPU torch ops are unaffected either way.
    """
    with _triton_interpret(interpret):
        import triton.language as tl

        try:  # imported lazily at launch by recent Triton, where it asserts the mode it was imported in
            import triton.experimental.gluon  # noqa: F401
        except ImportError:
            pass
    from triton.runtime.jit import JITFunction

    library_interpreted = not isinstance(tl.sum, JITFunction)
    if library_interpreted != interpret:
        have, want = ("interpreted", "compiled") if library_interpreted else ("compiled", "interpreted")
        raise TritonModeError(
            f"this process imported Triton {have}; {want} kernels need a fresh process "
            f"(set TRITON_INTERPRET={'1' if interpret else '0'} before anything imports triton)"
        )


class _SourceLoader(importlib.abc.Loader):
    """Runs exactly the given source. Python's file loader would run a __pycache__/*.pyc beside the file instead,
    which nothing verified (an unchecked-hash .pyc is used whatever the source says)."""

    def __init__(self, path: Path, source: bytes) -> None:
        self.path, self.source = path, source

    def exec_module(self, module: ModuleType) -> None:
        text = importlib.util.decode_source(self.source)
        # Triton compiles the source inspect finds through linecache, not the code object: make that this source.
        # An mtime of None keeps linecache.checkcache from replacing it with whatever is on disk later.
        lines = text.splitlines(keepends=True)
        linecache.cache[str(self.path)] = (len(text), None, lines, str(self.path))
        exec(compile(text, str(self.path), "exec", dont_inherit=True), module.__dict__)


def import_kernel_module(path: Path, interpret: bool, source: bytes | None = None) -> ModuleType:
    """Import one rendered kernel file (its `source` if given, else the file's bytes) under a name unique to its
    path, contents and mode (two builds never collide)."""
    ensure_triton_mode(interpret)
    path = Path(path).resolve()
    source = path.read_bytes() if source is None else source
    digest = hashlib.sha256(f"{path}:{interpret}:".encode() + source).hexdigest()[:16]
    module_name = f"pllm_kernels_{digest}_{path.stem}"
    spec = importlib.util.spec_from_loader(module_name, _SourceLoader(path, source), origin=str(path))
    assert spec is not None, f"cannot import kernel file {path}"
    spec.has_location = True  # module.__file__ is the kernel file, for tracebacks and inspect
    module = importlib.util.module_from_spec(spec)
    # Triton looks the kernel's source up through its module (inspect), so the module must be registered
    sys.modules[module_name] = module
    with _triton_interpret(interpret):
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    return module


def load_kernel_modules(kernel_dir: Path, interpret: bool, read: KernelReader | None = None) -> dict[str, ModuleType]:
    read = dir_reader(kernel_dir) if read is None else read
    sources = {name: read(f"{name}.py") for name in KERNEL_NAMES}
    missing = [name for name, source in sources.items() if source is None]
    if missing:
        raise FileNotFoundError(f"{kernel_dir}: missing kernel files {', '.join(f'{m}.py' for m in missing)}")
    return {name: import_kernel_module(Path(kernel_dir) / f"{name}.py", interpret, sources[name])
            for name in KERNEL_NAMES}


def compiled_artifacts_status(
    kernel_dir: Path, capability: tuple[int, int], triton_version: str, read: KernelReader | None = None
) -> tuple[bool, str]:
    """Whether ahead-of-time artifacts in kernel_dir/compiled/sm_XY match this GPU and Triton; the reason if not.

    On a mismatch the caller logs the reason and the kernels are compiled by Triton's JIT on first launch.
    """
    target = f"sm_{capability[0]}{capability[1]}"
    info_name = f"compiled/{target}/{COMPILED_INFO_FILE}"
    info_path = Path(kernel_dir) / info_name
    info_bytes = (dir_reader(kernel_dir) if read is None else read)(info_name)
    if info_bytes is None:
        built = sorted(p.name for p in (Path(kernel_dir) / "compiled").glob("sm_*"))
        return False, f"no kernels compiled for {target} (build has: {', '.join(built) or 'none'}); using JIT"
    try:
        info = json.loads(info_bytes)
    except ValueError as e:
        raise ValueError(f"{info_path}: not valid JSON ({e})") from None
    if info.get("triton_version") != triton_version:
        return False, (
            f"{info_path}: kernels compiled with triton {info.get('triton_version')}, this runtime has "
            f"{triton_version}; using JIT"
        )
    return True, f"{info_path}: kernels compiled for {target} with triton {triton_version}"


class TritonOps:
    """Ops backed by a build's rendered Triton kernels (on the GPU, or on the CPU under the interpreter)."""

    def __init__(self, kernel_dir: Path, interpret: bool, read: KernelReader | None = None) -> None:
        self.kernel_dir = Path(kernel_dir)
        self.interpret = interpret
        self.read = dir_reader(self.kernel_dir) if read is None else read
        self.kernels = load_kernel_modules(self.kernel_dir, interpret, self.read)
        self.eps = self.kernels["rms_norm"].EPS
        # Ahead-of-time artifacts are checked and reported; launches still go through Triton's JIT (and its
        # on-disk cache), which recompiles on a mismatch instead of failing.
        self.compiled_status: tuple[bool, str] | None = None
        if not interpret and torch.cuda.is_available():
            import triton

            capability = torch.cuda.get_device_capability()
            self.compiled_status = compiled_artifacts_status(self.kernel_dir, capability, triton.__version__, self.read)
            logger.info("kernels: %s", self.compiled_status[1])

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # eps is baked into the rendered kernel; a different one means the build belongs to another model
        assert eps == self.eps, f"rms_norm eps {eps} differs from the rendered kernel's {self.eps}"
        return self.kernels["rms_norm"].rms_norm(x, weight, residual)

    def rope_kv_write(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        positions: torch.Tensor,  # [T] int64
        cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] float32
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [T] int64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels["rope_kv_write"].rope_kv_write(
            q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping
        )

    def attention(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim], already rotated
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        if meta.is_decode_only:
            # one token per sequence: token i belongs to sequence i. The grid depends only on num_seqs and the
            # split count, never on device data, so a CUDA graph may capture this call.
            return self.kernels["decode_attention"].decode_attention(
                q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale, meta.max_seq_len
            )
        return self.kernels["prefill_attention"].prefill_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale,
            meta.max_query_len,
        )

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.nn.functional.linear(x, weight, bias)  # the projections stay library matmuls (cuBLAS)

    def mlp(self, x: torch.Tensor, gate_up_weight: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
        return self.kernels["mlp"].mlp(x, gate_up_weight, down_weight)
