"""Compiled cpu kernels kept by content, so a kernel compiled once is not compiled again.

A library is a pure function of its rendered source, the compiler (its version line) and the command line (relative
names, no debug info: cpu_compile's promise that the same inputs give identical files), so those, hashed, name it.
The cache is a folder of <hash>.so files: $PLLM_KERNEL_CACHE if set (set and empty: no cache), else
$XDG_CACHE_HOME/pllm/kernels (an absolute one), else ~/.cache/pllm/kernels (user_cache.py). Entries are written
under a temporary name and renamed into place, so a reader never sees a partial library, and two compiles of one
kernel at once both succeed. The cache only
saves time: a folder that cannot be made or written is passed over (a build never fails for it), and an entry is
checked against the hash of its bytes recorded beside it before it is used. Triton keeps its GPU kernels the same
way (~/.triton/cache).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from pllm.compiler.user_cache import user_cache_folder

logger = logging.getLogger("pllm")


def cache_dir() -> Path | None:
    """The folder entries live in, or None where $PLLM_KERNEL_CACHE is set empty (or no home can be named)."""
    return user_cache_folder("PLLM_KERNEL_CACHE", "kernels")


def kernel_key(source: bytes, compiler_version: str, command: list[str]) -> str:
    """The hash that names a library: its source, the compiler's version line and the command that compiles it."""
    h = hashlib.sha256()
    for part in (compiler_version.encode(), "\0".join(command).encode(), source):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def fetch(key: str, dest: Path) -> bool:
    """Copy the library named key to dest if the cache holds it intact; True if it did."""
    folder = cache_dir()
    if folder is None:
        return False
    entry, digest = folder / f"{key}.so", folder / f"{key}.sha256"
    try:
        data = entry.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest.read_text().strip():
            logger.warning("kernel cache: %s does not match its recorded hash; compiling afresh", entry)
            return False
        tmp = dest.with_name(dest.name + ".part")
        tmp.write_bytes(data)
        mode = tmp.stat().st_mode
        tmp.chmod(mode | ((mode & 0o444) >> 2))  # executable wherever readable, as the linker's own output
        tmp.replace(dest)
    except OSError:
        return False
    return True


def store(key: str, library: Path) -> None:
    """Keep a freshly compiled library under key (best effort: an unwritable cache is logged and passed over)."""
    folder = cache_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        data = library.read_bytes()
        for suffix, payload in ((".sha256", hashlib.sha256(data).hexdigest().encode()), (".so", data)):
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}", suffix=suffix)
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            os.replace(tmp, folder / f"{key}{suffix}")
    except OSError as e:
        logger.debug("kernel cache: not kept in %s (%s)", folder, e)
