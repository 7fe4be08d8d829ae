"""The build's output folder: what may be replaced (only a pllm build holding nothing but its own listed files, as
it wrote them), the folders made for it, and the swap of a finished build into place."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pllm.compiler.manifest import MANIFEST, MANIFEST_DIGEST_KEY, REPLACEABLE_FORMATS, manifest_digest, sha256_file
from pllm.compiler.scratch import make_scratch_dir, remove_scratch_dir


class BuildError(ValueError):
    """The model cannot be compiled; the message names the key, tensor or file."""


def make_parents(parent: Path) -> list[Path]:
    missing = [p for p in (parent, *parent.parents) if not p.exists()][::-1]
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"{parent}: cannot create the output's folder ({e.strerror})") from None
    return missing


def build_files(path: Path) -> dict[str, str | None] | None:
    """The files a previous pllm build in `path` lists, each with its sha256 (None for the manifest itself), or None
    if it is not provably one."""
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or type(manifest.get("format_version")) is not int:
        return None
    files = manifest.get("files")
    if manifest["format_version"] not in REPLACEABLE_FORMATS or not isinstance(files, dict) or not files:
        return None
    if manifest["format_version"] >= 2 and manifest.get(MANIFEST_DIGEST_KEY) != manifest_digest(manifest):
        return None
    for rel, digest in files.items():
        p = Path(rel)
        if not isinstance(rel, str) or p.is_absolute() or ".." in p.parts or rel == MANIFEST:
            return None
        if not isinstance(digest, str):
            return None
    return {MANIFEST: None, **files}


def _stray_entries(path: Path, listed: dict[str, str | None], check_bytes: bool) -> list[str]:
    """Entries under `path` a build with the `listed` files did not write: other files, folders, any symlink, and
    (check_bytes) listed files whose bytes are no longer those it wrote: edited by the user, so theirs now."""
    wanted = set(listed)
    folders = {str(parent) for rel in listed for parent in Path(rel).parents if str(parent) != "."}
    stray = []
    for top, dirs, files in os.walk(path):  # does not descend into symlinked folders
        for name in sorted(dirs + files):
            full = Path(top) / name
            rel = str(full.relative_to(path))
            if full.is_symlink() or (rel not in wanted and rel not in folders) or (rel in wanted) != full.is_file():
                stray.append(rel)
            elif check_bytes and listed.get(rel) is not None and sha256_file(full) != listed[rel]:
                stray.append(f"{rel} (changed since it was built)")
        dirs[:] = [d for d in dirs if str((Path(top) / d).relative_to(path)) in folders]
    return stray


def check_output_dir(dest: Path, check_bytes: bool = True) -> None:
    """Refuse an output that compiling would overwrite without it being a pllm build holding only its own files,
    as it wrote them (check_bytes: hash every listed file)."""
    _check_output_dir(dest, dest, check_bytes)


def _check_output_dir(dest: Path, name: Path, check_bytes: bool) -> None:
    """check_output_dir of `dest`, naming it `name` (the path the user gave) in errors."""
    if dest.is_symlink():
        raise BuildError(f"{name}: is a symbolic link; pass the directory itself (pllm never replaces a link)")
    if not dest.exists():
        return
    if not dest.is_dir():
        raise BuildError(f"{name}: exists and is not a directory; refusing to overwrite it")
    try:
        if not any(dest.iterdir()):
            return
    except OSError as e:
        raise BuildError(f"{name}: cannot read the existing output directory ({e.strerror})") from None
    listed = build_files(dest)
    if listed is None:
        raise BuildError(
            f"{name}: exists and is not a pllm build directory (no intact {MANIFEST} of a known format listing "
            "its files); refusing to overwrite it"
        )
    stray = _stray_entries(dest, listed, check_bytes)
    if stray:
        shown = ", ".join(stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
        raise BuildError(
            f"{name}: holds files the previous build did not write ({shown}); move them out or choose another "
            "output directory, pllm will not delete them"
        )


def as_umask_allows(path: Path) -> None:
    """safetensors writes its file owner-only (0600); a build is served by whoever may read its folder, so the
    weights get the mode every other file of the build gets from the umask."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def replace_dir(new: Path, dest: Path) -> None:
    """Swap `new` into place; a previous build is removed only after the new one is there."""
    # Again, for entries that appeared while compiling; the bytes were hashed before, and hashing the weights
    # twice more would double a rebuild's reading for an edit made in the seconds of the compile itself.
    check_output_dir(dest, check_bytes=False)
    old = None
    if dest.exists():
        old = make_scratch_dir(dest.parent, f".{dest.name}.old-")
        try:
            dest.rename(old / "build")
        except OSError:
            remove_scratch_dir(old)
            raise
        # And once more where nobody writes by name any longer: a file saved into the output between the check
        # above and the move is the user's, and goes back with the previous build rather than being deleted.
        try:
            _check_output_dir(old / "build", dest, check_bytes=False)
        except BuildError:
            (old / "build").rename(dest)
            remove_scratch_dir(old)
            raise
    new.rename(dest)
    if old is not None:
        remove_scratch_dir(old)
