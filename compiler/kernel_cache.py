"""Compiled cpu kernels kept by content, so a kernel compiled once is not compiled again.

A library is a pure function of its rendered source, the compiler (its version line) and the command line (relative
names, no debug info: cpu_compile's promise that the same inputs give identical files), so those, hashed, name it.
The cache is a folder of <hash>.so files: $PLLM_KERNEL_CACHE if set (set and empty: no cache), else
$XDG_CACHE_HOME/pllm/kernels (an absolute one), else ~/.cache/pllm/kernels (user_cache.py). Entries are written
under a temporary name and renamed into place, so a reader never sees a partial library, and two compiles of one
kernel at once both succeed. The cache only
saves time: a folder that cannot be made or written is passed over (a build never fails for it), and an entry is
checked against the hash of its bytes recorded beside it before it is used. It holds at most MAX_CACHE_BYTES: each
use of an entry refreshes its modification time, and the least recently used go first (evict). Triton keeps its GPU
kernels the same way (~/.triton/cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from pllm.compiler.user_cache import user_cache_folder

logger = logging.getLogger("pllm")
MAX_CACHE_BYTES = 256 << 20  # the cap: least recently used entries go past it (a model's kernels: a few MB)
STALE_S = 3600  # a temporary or half an entry this old was left by a killed compile (a live one is seconds old)
_ENTRY = re.compile(r"(?P<key>[0-9a-f]{64})(?P<suffix>\.so|\.sha256)")
_TEMP = re.compile(r"\.[0-9a-f]{64}[a-z0-9_]{8}(?:\.so|\.sha256)")  # mkstemp's names in _put


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
    """Copy the library named key to dest if the cache holds it intact; True if it did. A cache that cannot be read
    is passed over; dest that cannot be written (a full disk) is the build's error: raised, naming dest, with
    nothing of it left."""
    folder = cache_dir()
    if folder is None:
        return False
    entry, digest = folder / f"{key}.so", folder / f"{key}.sha256"
    try:
        data = entry.read_bytes()
        recorded = digest.read_text().strip()
    except (OSError, ValueError):
        return False
    if hashlib.sha256(data).hexdigest() != recorded:
        logger.warning("kernel cache: %s does not match its recorded hash; compiling afresh", entry)
        return False
    with contextlib.suppress(OSError):
        os.utime(entry)  # its last use, which eviction goes by (atime is not kept on relatime or noatime mounts)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        mode = tmp.stat().st_mode
        tmp.chmod(mode | ((mode & 0o444) >> 2))  # executable wherever readable, as the linker's own output
        tmp.replace(dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(dest)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def store(key: str, library: Path) -> None:
    """Keep a freshly compiled library under key (best effort: an unwritable cache is logged and passed over,
    leaving no temporary file and no entry without its library), then keep the cache under MAX_CACHE_BYTES."""
    folder = cache_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        data = library.read_bytes()
        # the library first: a hash recorded is an entry complete
        _put(folder, key, ".so", data)
        _put(folder, key, ".sha256", hashlib.sha256(data).hexdigest().encode())
    except OSError as e:
        logger.debug("kernel cache: not kept in %s (%s)", folder, e)
        if not (folder / f"{key}.sha256").exists():
            _unlink(folder / f"{key}.so")
        return
    evict(folder)


def _put(folder: Path, key: str, suffix: str, payload: bytes) -> None:
    """folder/<key><suffix> written under a temporary name and renamed into place; the temporary removed if not."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, folder / f"{key}{suffix}")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def evict(folder: Path, max_bytes: int = MAX_CACHE_BYTES) -> None:
    """Least recently used entries deleted until the cache holds at most max_bytes, and what killed writers left
    (temporaries, a library without its hash, a hash without its library) once STALE_S old. Only names this cache
    writes are touched. Safe beside other compiles: a reader whose entry goes compiles afresh, and a writer's files
    are new, so never the least recently used."""
    now = time.time()
    entries: dict[str, dict[str, os.stat_result]] = {}
    try:
        for e in os.scandir(folder):
            m = _ENTRY.fullmatch(e.name) or _TEMP.fullmatch(e.name)
            if m is None or not e.is_file(follow_symlinks=False):
                continue
            st = e.stat(follow_symlinks=False)
            if m.re is _TEMP:
                if now - st.st_mtime > STALE_S:
                    _unlink(folder / e.name)
                continue
            entries.setdefault(m["key"], {})[m["suffix"]] = st
    except OSError:
        return
    complete = []
    for key, parts in entries.items():
        if len(parts) == 2:
            complete.append((parts[".so"].st_mtime, key, sum(st.st_size for st in parts.values())))
        elif now - max(st.st_mtime for st in parts.values()) > STALE_S:
            for suffix in parts:
                _unlink(folder / f"{key}{suffix}")
    total = sum(size for _, _, size in complete)
    for _, key, size in sorted(complete):
        if total <= max_bytes:
            break
        for suffix in (".sha256", ".so"):
            _unlink(folder / f"{key}{suffix}")
        total -= size


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
