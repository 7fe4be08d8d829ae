"""A build verified once is not hashed again while its files are unchanged (compiler/verify_stamp.py); any change to
a file, however its times are set back, and any doubt about the stamp, means hashing again."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from pllm.compiler import kernel_cache, manifest, user_cache, verify_stamp
from pllm.compiler.manifest import BuildDirError, open_build

SETTLE_NS = 50_000_000  # the racy window the tests use, so a fresh copy is trusted after a short sleep


@pytest.fixture
def hashes(monkeypatch):
    """The files hashed by verify_files, in order, as it runs."""
    seen: list[str] = []
    real = manifest.sha256_and_identity

    def counting(path):
        seen.append(path.name)
        return real(path)

    monkeypatch.setattr(manifest, "sha256_and_identity", counting)
    return seen


@pytest.fixture
def settled_build(tiny_build, tmp_path, monkeypatch):
    """A copy of a tiny build whose files are older than the (shortened) racy window."""
    monkeypatch.setattr(verify_stamp, "RACY_NS", SETTLE_NS)
    monkeypatch.setattr(verify_stamp, "file_system_type", lambda path: "ext4")  # whatever the test machine's /tmp is
    monkeypatch.setenv(verify_stamp.ENV, str(tmp_path / "stamps"))
    build = tmp_path / "build"
    shutil.copytree(tiny_build("llama"), build)
    time.sleep(2 * SETTLE_NS / 1e9)
    return build


def listed(build) -> set[str]:
    return set(open_build(build, verify=False).manifest["files"])


def test_an_unchanged_build_is_hashed_once(settled_build, hashes):
    open_build(settled_build)
    assert set(hashes) == {os.path.basename(rel) for rel in listed(settled_build)}
    hashes.clear()
    open_build(settled_build)
    open_build(settled_build)
    assert hashes == []


def test_a_byte_changed_with_its_times_set_back_is_found(settled_build, hashes):
    open_build(settled_build)
    weights = settled_build / "model.safetensors"
    st = os.stat(weights)
    with open(weights, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # the size and modification time as they were
    hashes.clear()
    with pytest.raises(BuildDirError, match="model.safetensors: sha256 does not match the manifest"):
        open_build(settled_build)
    assert hashes == ["model.safetensors"]  # only the changed file: the others are as stamped


def test_a_file_replaced_by_another_of_the_same_size_and_times_is_found(settled_build):
    open_build(settled_build)
    weights = settled_build / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    st = os.stat(weights)
    other = settled_build / "other"
    other.write_bytes(bytes(data))
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, weights)
    with pytest.raises(BuildDirError, match="sha256 does not match"):
        open_build(settled_build)


def test_a_file_changed_within_the_racy_window_is_not_trusted(tiny_build, tmp_path, monkeypatch, hashes):
    """Files changed less than RACY_NS before the verification are hashed every time until they have settled."""
    monkeypatch.setattr(verify_stamp, "file_system_type", lambda path: "ext4")
    monkeypatch.setenv(verify_stamp.ENV, str(tmp_path / "stamps"))
    build = tmp_path / "build"
    shutil.copytree(tiny_build("llama"), build)  # just now: within the real 2 s window
    open_build(build)
    first = len(hashes)
    open_build(build)
    assert first > 0 and len(hashes) == 2 * first


def test_a_copy_is_hashed_on_its_own(settled_build, tmp_path, hashes):
    open_build(settled_build)
    copy = tmp_path / "copy"
    shutil.copytree(settled_build, copy)  # copy2: the same sizes and modification times, new inodes
    hashes.clear()
    open_build(copy)
    assert len(hashes) == len(listed(copy))


@pytest.mark.parametrize("where", ["off", "a file", "garbled"])
def test_no_usable_stamp_means_hashing_every_time(settled_build, tmp_path, monkeypatch, hashes, where):
    if where == "off":
        monkeypatch.setenv(verify_stamp.ENV, "")
    elif where == "a file":  # the stamp folder cannot be made
        (tmp_path / "blocked").write_text("")
        monkeypatch.setenv(verify_stamp.ENV, str(tmp_path / "blocked" / "stamps"))
    open_build(settled_build)
    if where == "garbled":
        for stamp in (tmp_path / "stamps").iterdir():
            stamp.write_text('{"format": 1, "files": {"model.safetensors": [1, 2]}}')
    open_build(settled_build)
    assert len(hashes) == 2 * len(listed(settled_build))


def test_the_racy_window_counts_from_before_the_identities_were_taken(settled_build, tmp_path):
    """A file whose ctime is within RACY_NS of the moment the identities were taken is left out of the stamp, however
    long the hashing took after that moment."""
    weights = settled_build / "model.safetensors"
    ident = verify_stamp.FileIdentity.of(weights)
    stamp = verify_stamp.stamp_for(settled_build, "0" * 64, 0)
    verify_stamp.record(stamp, {"model.safetensors": ident}, ident.ctime_ns + SETTLE_NS // 2)
    assert verify_stamp.unchanged(stamp, {"model.safetensors": ident}) == set()
    verify_stamp.record(stamp, {"model.safetensors": ident}, ident.ctime_ns + 2 * SETTLE_NS)
    assert verify_stamp.unchanged(stamp, {"model.safetensors": ident}) == {"model.safetensors"}


def test_a_stale_stamp_or_an_untrusted_file_system_means_hashing(settled_build, monkeypatch, hashes):
    open_build(settled_build)
    max_age = verify_stamp.STAMP_MAX_AGE_S
    monkeypatch.setattr(verify_stamp, "STAMP_MAX_AGE_S", 0)  # every stamp is too old
    open_build(settled_build)
    monkeypatch.setattr(verify_stamp, "STAMP_MAX_AGE_S", max_age)
    monkeypatch.setattr(verify_stamp, "file_system_type", lambda path: "nfs4")  # the server reports the times
    open_build(settled_build)
    assert len(hashes) == 3 * len(listed(settled_build))


def test_a_build_under_a_path_that_is_not_utf8(settled_build, tmp_path, hashes):
    odd = tmp_path / os.fsdecode(b"mod\xe8le")
    shutil.copytree(settled_build, odd)
    time.sleep(2 * SETTLE_NS / 1e9)
    open_build(odd)
    hashes.clear()
    open_build(odd)
    assert hashes == []


def test_no_home_means_no_stamps(monkeypatch):
    for name in (verify_stamp.ENV, "PLLM_KERNEL_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored, as the XDG spec says

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(user_cache.Path, "home", staticmethod(no_home))
    assert verify_stamp.stamp_dir() is None
    assert kernel_cache.cache_dir() is None  # the same rule for every per-user cache


def test_the_file_system_type_is_read_from_mountinfo(tmp_path):
    if not os.path.exists("/proc/self/mountinfo"):
        pytest.skip("no /proc here: no file system is trusted, every file hashed")
    assert verify_stamp.file_system_type(tmp_path) is not None
    assert verify_stamp.file_system_type("/proc/self") == "proc"
