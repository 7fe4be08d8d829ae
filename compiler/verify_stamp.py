"""What a build's full verification found, so the next start of the same build can skip re-hashing unchanged files.

manifest.verify_files hashes every file a build lists against its sha256: ~1 GB/s on one core, so a 135M-parameter
bf16 build costs 0.3 s and a 1B one 2.3 s at every start (a 7B one ~15 s). After a verification that passes, this
records each file's identity as the file system keeps it (device, inode, size, modification and change times,
taken before it was hashed) in a stamp under $PLLM_VERIFY_CACHE (empty: no stamps), else $XDG_CACHE_HOME/pllm/
verified or ~/.cache/pllm/verified, named by the build's resolved path, its manifest digest and the rank. The next
verification of that build hashes only the files whose identity differs from the stamp's.

Why an unchanged identity means unchanged bytes: any write to a file, and any change to its times or permissions,
sets its change time (ctime) to the present, which no user can set back; a copy or replacement is a new inode. Two
things could still hide a change, and neither is trusted: a write within the file system's timestamp granularity of
the moment the stamp was taken (so a file whose ctime is less than RACY_NS before the stamp is left out of it, and
hashed next time), and bytes changed under the file system (bit rot, a raw write to the device), which the storage's
own checks are for. A stamp that cannot be read or written is no error: the files are hashed, as without one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import astuple, dataclass
from pathlib import Path

ENV = "PLLM_VERIFY_CACHE"
RACY_NS = 2_000_000_000  # FAT's 2 s timestamps are the coarsest in common use; ext4, xfs and overlayfs keep ~4 ms
FORMAT = 1


@dataclass(frozen=True)
class FileIdentity:
    """A file as the file system identifies it; equal identities, taken RACY_NS apart, mean the same bytes."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @staticmethod
    def of(path: Path) -> FileIdentity:
        st = os.stat(path)
        return FileIdentity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def stamp_dir() -> Path | None:
    """Where stamps live, or None where $PLLM_VERIFY_CACHE is set empty (every start hashes every file)."""
    configured = os.environ.get(ENV)
    if configured is not None:
        return Path(configured) if configured else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pllm" / "verified"


def _stamp_path(build_path: Path, manifest_digest: str, rank: int) -> Path | None:
    folder = stamp_dir()
    if folder is None:
        return None
    key = hashlib.sha256(f"{build_path.resolve()}\0{manifest_digest}\0{rank}".encode()).hexdigest()
    return folder / f"{key}.json"


def unchanged(build_path: Path, manifest_digest: str, rank: int, current: dict[str, FileIdentity]) -> set[str]:
    """The files (relative paths) whose identity now equals the one stamped when they last hashed correctly."""
    stamp = _stamp_path(build_path, manifest_digest, rank)
    if stamp is None:
        return set()
    try:
        recorded = json.loads(stamp.read_text())
        if recorded.get("format") != FORMAT:
            return set()
        files = {rel: FileIdentity(*ident) for rel, ident in recorded["files"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return set()
    return {rel for rel, ident in current.items() if files.get(rel) == ident}


def record(build_path: Path, manifest_digest: str, rank: int, verified: dict[str, FileIdentity]) -> None:
    """Stamps the files that just hashed correctly, each with the identity it had before it was hashed, leaving out
    those changed too recently to tell apart from a change still to come (RACY_NS). Written whole or not at all."""
    stamp = _stamp_path(build_path, manifest_digest, rank)
    if stamp is None:
        return
    settled = time.time_ns() - RACY_NS
    files = {rel: astuple(ident) for rel, ident in verified.items() if ident.ctime_ns < settled}
    tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"format": FORMAT, "build": str(build_path.resolve()), "files": files}))
        os.replace(tmp, stamp)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
