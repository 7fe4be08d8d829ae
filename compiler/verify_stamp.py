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
own checks are for (and a stamp older than STAMP_MAX_AGE_S is not used, so every file is hashed again at least that
often). Only file systems that keep these promises themselves are trusted (LOCAL_FILE_SYSTEMS, read from
/proc/self/mountinfo): on a network or FUSE mount the server or daemon reports the times and inode numbers, some
derive ctime from a settable mtime or renumber inodes at each mount, so there every file is hashed every time, as on
a system without /proc. A stamp that cannot be read or written is no error: the files are hashed, as without one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import astuple, dataclass
from pathlib import Path

from pllm.compiler.user_cache import user_cache_folder

ENV = "PLLM_VERIFY_CACHE"
RACY_NS = 2_000_000_000  # FAT's 2 s timestamps are the coarsest in common use; ext4, xfs and overlayfs keep ~4 ms
STAMP_MAX_AGE_S = 7 * 24 * 3600
FORMAT = 1
# file systems whose ctime and inode numbers the kernel itself keeps (mountinfo's type field)
_OCTAL = re.compile(rb"\\([0-7]{3})")  # mountinfo's escapes of space, tab, newline and backslash
LOCAL_FILE_SYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs"})


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
        return FileIdentity.from_stat(os.stat(path))

    @staticmethod
    def from_stat(st: os.stat_result) -> FileIdentity:
        return FileIdentity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def stamp_dir() -> Path | None:
    """Where stamps live, or None where $PLLM_VERIFY_CACHE is set empty (every start hashes every file) or no cache
    folder can be named."""
    return user_cache_folder(ENV, "verified")


def file_system_type(path: Path) -> str | None:
    """The type of the file system `path` is on (its deepest mount in /proc/self/mountinfo), None where unknown."""
    try:
        lines = Path("/proc/self/mountinfo").read_bytes().split(b"\n")
    except OSError:
        return None
    target, best, kind = os.path.realpath(path), "", None
    for line in lines:
        fields = line.split(b" ")
        try:
            mount = os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4]))  # \040: a space
            fs = fields[fields.index(b"-", 6) + 1].decode("ascii")
        except (IndexError, ValueError):
            continue
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fs
    return kind


@dataclass(frozen=True)
class Stamp:
    """Where one build's stamp for one rank lives."""

    path: Path
    build: str  # the build's resolved path, written into the stamp for whoever reads it


def stamp_for(build_path: Path, manifest_digest: str, rank: int) -> Stamp | None:
    """The stamp of this build (its resolved path and manifest digest) for `rank`; None where stamps are off, no
    cache folder can be named, or the build is not on a trusted file system."""
    try:
        folder = stamp_dir()
        if folder is None or file_system_type(build_path) not in LOCAL_FILE_SYSTEMS:
            return None
        resolved = build_path.resolve()
    except (OSError, RuntimeError):  # (a link loop)
        return None
    key = hashlib.sha256(os.fsencode(resolved) + f"\0{manifest_digest}\0{rank}".encode()).hexdigest()
    return Stamp(folder / f"{key}.json", str(resolved))


def unchanged(stamp: Stamp | None, current: dict[str, FileIdentity]) -> set[str]:
    """The files (relative paths) whose identity now equals the one stamped when they last hashed correctly."""
    if stamp is None:
        return set()
    try:
        recorded = json.loads(stamp.path.read_text())
        if recorded.get("format") != FORMAT or not time.time() - STAMP_MAX_AGE_S < recorded["written_s"] <= time.time():
            return set()
        files = {rel: FileIdentity(*ident) for rel, ident in recorded["files"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return set()
    return {rel for rel, ident in current.items() if files.get(rel) == ident}


def record(stamp: Stamp | None, verified: dict[str, FileIdentity], taken_ns: int) -> None:
    """Stamps the files that just hashed correctly, each with the identity it had before it was hashed, leaving out
    those changed within RACY_NS of taken_ns (the clock read before any identity was taken): too recently to tell
    apart from a change in the same timestamp tick. Written whole or not at all."""
    if stamp is None:
        return
    files = {rel: astuple(ident) for rel, ident in verified.items() if ident.ctime_ns < taken_ns - RACY_NS}
    try:
        stamp.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{stamp.path.name}.", dir=stamp.path.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, "written_s": time.time(), "build": stamp.build, "files": files}, f)
        os.replace(tmp, stamp.path)
    except (OSError, UnicodeError):
        try:
            os.unlink(tmp)
        except OSError:
            pass
