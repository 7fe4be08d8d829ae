"""Scratch directories named after the owning process, so those left by a killed compile can be recognised later."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

MAX_PID = 1 << 22  # Linux's pid_max ceiling; a larger number in a name is not one of ours


def make_scratch_dir(parent: Path, prefix: str) -> Path:
    """A new directory `<prefix><pid>-<random>` in `parent`."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def scratch_pattern(prefix_regex: str) -> re.Pattern[str]:
    # mkdtemp's random part is 8 characters of [a-z0-9_]
    return re.compile(rf"{prefix_regex}(?P<pid>[0-9]+)-[a-z0-9_]{{8}}")


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


def remove_stale_scratch(parent: Path, pattern: re.Pattern[str]) -> list[Path]:
    """Remove directories in `parent` whose names match `pattern` and whose owning process no longer exists."""
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed  # an unreadable parent has nothing we can clean; the compile itself reports the parent
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        # never a symlink: rmtree would refuse it, and what it points to is not ours
        if m is None or not entry.is_dir(follow_symlinks=False) or not _process_gone(int(m["pid"])):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed
