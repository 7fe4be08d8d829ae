"""The build's output folder: what may be replaced (only a pllm build holding nothing but its own listed files, as
it wrote them), the folders made for it, and the swap of a finished build into place."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file

from pllm.compiler.manifest import (
    MANIFEST,
    MANIFEST_DIGEST_KEY,
    REPLACEABLE_FORMATS,
    manifest_digest,
    sha256_and_identity,
)
from pllm.compiler.scratch import make_scratch_dir, remove_scratch_dir, remove_stale_scratch, scratch_pattern
from pllm.compiler.verify_stamp import RACY_NS, FileIdentity

logger = logging.getLogger("pllm")


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


def _stray_entries(path: Path, listed: dict[str, str | None], hashed: dict[str, FileIdentity] | None,
                   seen: dict[str, FileIdentity]) -> list[str]:
    """Entries under `path` a build with the `listed` files did not write: other files, folders, any symlink, and
    listed files whose bytes are no longer those it wrote (edited by the user, so theirs now). A listed file is
    hashed unless `hashed` holds its present identity (hashed None: every file); the identity each had as it was
    hashed, or was seen unchanged, goes into `seen`."""
    wanted = set(listed)
    folders = {str(parent) for rel in listed for parent in Path(rel).parents if str(parent) != "."}
    stray = []
    for top, dirs, files in os.walk(path):  # does not descend into symlinked folders
        for name in sorted(dirs + files):
            full = Path(top) / name
            rel = str(full.relative_to(path))
            if full.is_symlink() or (rel not in wanted and rel not in folders) or (rel in wanted) != full.is_file():
                stray.append(rel)
            elif rel in wanted:
                ident = FileIdentity.from_stat(full.stat())
                if hashed is not None and hashed.get(rel) == ident:
                    seen[rel] = ident
                elif listed[rel] is None:  # the manifest: build_files has checked its own digest
                    seen[rel] = ident
                else:
                    digest, seen[rel] = sha256_and_identity(full)
                    if digest != listed[rel]:
                        stray.append(f"{rel} (changed since it was built)")
        dirs[:] = [d for d in dirs if str((Path(top) / d).relative_to(path)) in folders]
    return stray


@dataclass(frozen=True)
class OutputState:
    """An output as check_output_dir last saw it: each listed file's identity when its bytes were found to be the
    build's (none changed within RACY_NS of the look, which a same-tick write could hide). Empty: no build there."""

    files: dict[str, FileIdentity] = field(default_factory=dict)


def check_output_dir(dest: Path) -> OutputState:
    """Refuse an output that compiling would overwrite without it being a pllm build holding only its own files,
    as it wrote them (every listed file hashed), and an output the shell is in."""
    return _check_output_dir(dest, dest, None)


def _check_output_dir(dest: Path, name: Path, hashed: dict[str, FileIdentity] | None) -> OutputState:
    """check_output_dir of `dest`, naming it `name` (the path the user gave) in errors; files whose identity is in
    `hashed` unchanged are not hashed again."""
    if dest.is_symlink():
        raise BuildError(f"{name}: is a symbolic link; pass the directory itself (pllm never replaces a link)")
    if not dest.exists():
        return OutputState()
    if not dest.is_dir():
        raise BuildError(f"{name}: exists and is not a directory; refusing to overwrite it")
    _refuse_current_dir(dest, name)
    try:
        if not any(dest.iterdir()):
            return OutputState()
    except OSError as e:
        raise BuildError(f"{name}: cannot read the existing output directory ({e.strerror})") from None
    listed = build_files(dest)
    if listed is None:
        raise BuildError(
            f"{name}: exists and is not a pllm build directory (no intact {MANIFEST} of a known format listing "
            "its files); refusing to overwrite it"
        )
    taken_ns = time.time_ns()
    seen: dict[str, FileIdentity] = {}
    stray = _stray_entries(dest, listed, hashed, seen)
    if stray:
        shown = ", ".join(stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
        raise BuildError(
            f"{name}: holds files the previous build did not write ({shown}); move them out or choose another "
            "output directory, pllm will not delete them"
        )
    return OutputState({rel: ident for rel, ident in seen.items() if ident.ctime_ns < taken_ns - RACY_NS})


def _refuse_current_dir(dest: Path, name: Path) -> None:
    """The output is replaced as a folder: a shell inside it would be left in a deleted one."""
    try:
        cwd = Path(os.getcwd())
    except OSError:  # the current directory was deleted: nothing to protect
        return
    real = dest.resolve()
    if real == cwd or real in cwd.parents:
        raise BuildError(f"{name}: is the current directory{'' if real == cwd else ' or holds it'}; pllm replaces the "
                         "output folder whole, so run pllm-compile from another folder or choose another output")


def complete_build(path: Path) -> bool:
    """Whether `path` holds a pllm build with every file it lists (not hashed: whether they are intact is the
    loader's check)."""
    listed = build_files(path)
    return listed is not None and all((path / rel).is_file() and not (path / rel).is_symlink() for rel in listed)


def only_build_files(path: Path) -> bool:
    """Whether `path` is a pllm build of nothing but its own files, as it wrote them (every one hashed)."""
    try:
        _check_output_dir(path, path, None)
    except BuildError:
        return False
    return build_files(path) is not None


def as_umask_allows(path: Path) -> None:
    """safetensors writes its file owner-only (0600); a build is served by whoever may read its folder, so the
    weights get the mode every other file of the build gets from the umask."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def write_weights(tensors: dict, path: Path) -> None:
    """safetensors' save_file, its I/O errors (a Rust error's text) raised as the OSError they are, naming the
    file; then as_umask_allows."""
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        m = _OS_ERROR.search(str(e))
        if m is None:
            raise BuildError(f"{path}: cannot write the weights ({e})") from None
        raise OSError(int(m[1]), os.strerror(int(m[1])), str(path)) from None
    as_umask_allows(path)


_OS_ERROR = re.compile(r"\(os error ([0-9]+)\)")  # how Rust's std::io::Error shows an errno


def replace_dir(new: Path, dest: Path, seen: OutputState) -> None:
    """Swap `new` into place with the mode and group the output had; a previous build is removed only after the
    new one is there, and only if it is still as check_output_dir saw it (`seen`): files changed since are hashed
    again, an edit refuses. Any failure or interrupt puts the previous build back."""
    # Again, for entries that appeared and files changed while compiling (the unchanged ones are not hashed again)
    seen = _check_output_dir(dest, dest, seen.files)
    if not dest.exists():
        new.rename(dest)
        return
    old = make_scratch_dir(dest.parent, f".{dest.name}.old-")
    previous = old / PREVIOUS
    try:
        dest.rename(previous)
        # And once more where nobody writes by name any longer: a file saved or edited in the output between the
        # look above and the move is the user's, and goes back with the previous build rather than being deleted.
        _check_output_dir(previous, dest, seen.files)
        _keep_mode(previous, new)
        new.rename(dest)
    except BaseException:
        _put_back(old, dest)
        raise
    discard_previous(old)


PREVIOUS = "build"  # in a `.<name>.old-` scratch folder: the previous build, moved aside
DISCARDED = "discarded"  # what it is renamed to once the new build is in place, so a half-deleted one is known


def _put_back(old: Path, dest: Path) -> None:
    if os.path.lexists(old / PREVIOUS):
        try:
            (old / PREVIOUS).rename(dest)
        except OSError as e:  # its lock is held until this process ends; the next compile here puts it back
            raise BuildError(f"{dest}: the previous build could not be moved back ({e.strerror}); it is in "
                             f"{old / PREVIOUS}") from None
    remove_scratch_dir(old)


def discard_previous(old: Path) -> None:
    (old / PREVIOUS).rename(old / DISCARDED)
    remove_scratch_dir(old)


def _keep_mode(previous: Path, new: Path) -> None:
    """The output folder's permissions and group are the user's choice (a private build stays private)."""
    st = previous.stat()
    try:
        os.chown(new, -1, st.st_gid)
    except OSError:  # not a group this user is in: the folder's mode still applies
        pass
    new.chmod(stat.S_IMODE(st.st_mode))


# scratch siblings of any output in the same parent: `.<name>.tmp-<pid>-<random>` (a build being written) and
# `.<name>.old-<pid>-<random>` (the previous build of <name>, moved aside while the new one is swapped in)
TMP_RE = scratch_pattern(r"\..+\.tmp-")
OLD_RE = scratch_pattern(r"\.(?P<name>.+)\.old-")


def remove_stale_swaps(parent: Path) -> None:
    """Clean up after compiles into `parent` that were killed: their half-written builds are deleted; a previous
    build one had moved aside goes back to its place if that is free, and is deleted only once its place holds a
    complete build again (else it is kept, and said so)."""
    remove_stale_scratch(parent, TMP_RE)
    remove_stale_scratch(parent, OLD_RE, keep=_settle_previous)


def _settle_previous(old: Path, match: re.Match[str]) -> bool:
    """A killed compile's `.<name>.old-` folder (its lock now ours): True to keep it."""
    dest, previous = old.parent / match["name"], old / PREVIOUS
    if not os.path.lexists(previous):  # never moved, already moved back, or being discarded: nothing of the user's
        return False
    if not os.path.lexists(dest):
        try:
            previous.rename(dest)
        except OSError as e:
            logger.warning("%s: a killed compile left the previous build in %s, which could not be moved back (%s)",
                           dest, previous, e.strerror)
            return True
        logger.warning("%s: put back the previous build a killed compile had moved aside", dest)
        return False
    if complete_build(dest) and only_build_files(previous):
        return False
    logger.warning("%s: a killed compile left the previous build in %s, kept since %s holds no complete build (or "
                   "it holds files of yours); move it back or delete it yourself", dest, previous, dest)
    return True
