"""The folders pllm keeps per-user caches in (compiled kernels, verified builds): one rule for all of them."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_folder(env: str, name: str) -> Path | None:
    """$`env` if set (set and empty: None, no cache), else $XDG_CACHE_HOME/pllm/`name` (only an absolute
    $XDG_CACHE_HOME: the XDG spec says to ignore a relative one), else ~/.cache/pllm/`name`; None where there is no
    home to name (no $HOME and no passwd entry)."""
    configured = os.environ.get(env)
    if configured is not None:
        return Path(configured) if configured else None
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "pllm" / name
    try:
        return Path.home() / ".cache" / "pllm" / name
    except RuntimeError:
        return None
