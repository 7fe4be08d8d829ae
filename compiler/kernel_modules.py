"""Importing rendered kernel files in Triton's compiled or interpreted mode: shared by gpu_compile and the runtime."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.abc
import importlib.util
import linecache
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

COMPILED_INFO_FILE = "compiled.json"  # written by compiler/gpu_compile.py next to each target's artifacts


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
