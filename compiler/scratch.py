"""Scratch directories that hold a lock while their compile lives, so those left by a killed compile are known."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

MAX_PID = 1 << 22  # Linux's pid_max ceiling; a larger number in a name is not one of ours
LOCK_FILE = ".pllm-lock"
# The open lock file of each scratch directory this process made. The kernel drops an flock when its holder dies,
# SIGKILL included, so a lock another compile can take marks a directory whose owner is gone, wherever that owner
# ran (another container or host sharing the folder, where its pid means nothing).
_held: dict[Path, int] = {}


def make_scratch_dir(parent: Path, prefix: str) -> Path:
    """A new directory `<prefix><pid>-<random>` in `parent`, locked until remove_scratch_dir or this process ends."""
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _held[path] = fd
    return path


def remove_scratch_dir(path: Path) -> None:
    """Delete a scratch directory this process made, and let go of its lock."""
    shutil.rmtree(path, ignore_errors=True)
    fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)


def scratch_pattern(prefix_regex: str) -> re.Pattern[str]:
    # mkdtemp's random part is 8 characters of [a-z0-9_]
    return re.compile(rf"{prefix_regex}(?P<pid>[0-9]+)-[a-z0-9_]{{8}}")


_NO_LOCK = -1  # _claim of a directory without a lock file whose named pid is gone


def _claim(path: str, pid: int) -> int | None:
    """The lock of a scratch directory whose owner is gone, now held by this process (_NO_LOCK where it has none
    and its named pid is gone), or None while its owner may live."""
    if Path(path) in _held:
        return None
    try:
        fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:  # not pllm's (a folder of the user's named like one), or a compile between mkdtemp and
        return _NO_LOCK if _process_gone(pid) else None  # its lock (then empty)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None  # a live compile holds it, or another compile is cleaning it up
    return fd


def _process_gone(pid: int) -> bool:
    if not 0 < pid < MAX_PID or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    return False


def remove_stale_scratch(parent: Path, pattern: re.Pattern[str],
                         keep: Callable[[Path, re.Match[str]], bool] | None = None) -> list[Path]:
    """Remove directories in `parent` whose names match `pattern` and whose owning compile is gone, except those
    `keep` (called while this process holds the directory's lock, so no other compile cleans it at once) says to
    keep, having seen to what they hold. Only a directory holding pllm's lock file is pllm's: one without it is
    removed only if empty (a compile killed between making it and its lock), never with what it holds, since a
    folder of the user's may be named like one."""
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed  # an unreadable parent has nothing we can clean; the compile itself reports the parent
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        # never a symlink: rmtree would refuse it, and what it points to is not ours
        if m is None or not entry.is_dir(follow_symlinks=False):
            continue
        fd = _claim(entry.path, int(m["pid"]))
        if fd is None:
            continue
        if fd == _NO_LOCK:
            try:
                os.rmdir(entry.path)  # empty only
            except OSError:
                continue
            removed.append(Path(entry.path))
            continue
        try:
            if keep is not None and keep(Path(entry.path), m):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
        finally:
            os.close(fd)
    return removed
