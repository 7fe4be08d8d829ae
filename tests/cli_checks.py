"""What every failed pllm-compile must show: one error line, and a file tree unchanged down to modes and links."""

import hashlib
import os
import stat
from pathlib import Path

from pllm.compiler.cli import main as compile_main


def snapshot(path: Path) -> dict:
    """Everything about a tree that a compile could change, without following symlinks or reading FIFOs."""
    def entry(p: Path):
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            return ("link", os.readlink(p))
        if stat.S_ISREG(st.st_mode):
            return ("file", st.st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
        return ("other", st.st_mode)

    if not os.path.lexists(path):
        return {}
    out = {".": entry(path)}
    if path.is_dir() and not path.is_symlink():
        for top, dirs, files in os.walk(path):
            for name in dirs + files:
                full = Path(top) / name
                out[str(full.relative_to(path))] = entry(full)
    return out


def run_cli(args: list[str], capsys) -> str:
    """Run pllm-compile in-process, expecting failure; returns its one stderr line."""
    capsys.readouterr()  # drop what making the fixtures printed
    rc = compile_main([*args, "-q"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc != 0, err
    assert len(lines) == 1 and lines[0].startswith("pllm-compile: error:"), err
    assert "Traceback" not in err
    return lines[0]
