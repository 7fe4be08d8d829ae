"""The cpu kernel cache (compiler/kernel_cache.py): a kernel compiled once is fetched, never half-read, and a cache
that cannot be used costs only the time it would have saved."""

from __future__ import annotations

import dataclasses
import errno
import os
import time

import pytest

from pllm.compiler import cpu_compile, kernel_cache
from pllm.compiler.cpu_compile import compile_cpu_kernels, find_compiler
from pllm.compiler.plan import make_plan
from pllm.compiler.render import render_plan
from pllm.models.spec import ModelSpec

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")

SPEC = ModelSpec(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256, rms_norm_eps=1e-5,
                 rope_theta=10000.0, rope_scaling=None, max_position_embeddings=128, tie_word_embeddings=False,
                 attention_bias=False, torch_dtype="float32", bos_token_id=1, eos_token_ids=(2,))


def compile_rope(out, head_dim: int = 16):
    """The smallest kernel (the RoPE + KV write) rendered into out and compiled: (manifest entry, library bytes)."""
    plan = make_plan(dataclasses.replace(SPEC, head_dim=head_dim), "float32", 16)
    plan = dataclasses.replace(plan, kernels=(plan.kernel("cpu_rope_kv_write"),))
    render_plan(plan, out)
    entry = compile_cpu_kernels(out, plan)
    assert "error" not in entry, entry
    return entry, (out / entry["libraries"]["cpu_rope_kv_write"]).read_bytes()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("PLLM_KERNEL_CACHE", str(folder))
    return folder


@pytest.fixture
def compiles(monkeypatch):
    """How many times the compiler ran."""
    runs = []
    real = cpu_compile._run_compiler
    monkeypatch.setattr(cpu_compile, "_run_compiler", lambda cmd, cwd: runs.append(cmd) or real(cmd, cwd))
    return runs


def test_a_kernel_compiled_once_is_fetched_as_the_compiler_made_it(tmp_path, cache, compiles):
    entry, first = compile_rope(tmp_path / "a")
    assert len(compiles) == 1 and len(list(cache.glob("*.so"))) == 1
    again, fetched = compile_rope(tmp_path / "b")
    assert len(compiles) == 1 and again == entry and fetched == first
    name = entry["libraries"]["cpu_rope_kv_write"]
    assert (tmp_path / "b" / name).stat().st_mode == (tmp_path / "a" / name).stat().st_mode  # the linker's mode
    compile_rope(tmp_path / "c", head_dim=32)  # another source: another entry
    assert len(compiles) == 2 and len(list(cache.glob("*.so"))) == 2


def test_a_damaged_entry_is_compiled_afresh(tmp_path, cache, compiles, caplog):
    _, first = compile_rope(tmp_path / "a")
    (entry,) = cache.glob("*.so")
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte changed after the hash was recorded
    entry.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="pllm"):
        _, again = compile_rope(tmp_path / "b")
    assert len(compiles) == 2 and again == first and "does not match its recorded hash" in caplog.text


def test_an_empty_setting_turns_the_cache_off(tmp_path, monkeypatch, compiles):
    monkeypatch.setenv("PLLM_KERNEL_CACHE", "")
    assert kernel_cache.cache_dir() is None
    compile_rope(tmp_path / "a")
    compile_rope(tmp_path / "b")
    assert len(compiles) == 2


def test_an_unusable_cache_folder_only_costs_the_compile(tmp_path, monkeypatch, compiles):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("PLLM_KERNEL_CACHE", str(blocker / "cache"))
    _, first = compile_rope(tmp_path / "a")
    _, again = compile_rope(tmp_path / "b")
    assert len(compiles) == 2 and again == first


def test_the_default_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("PLLM_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernel_cache.cache_dir() == tmp_path / "pllm" / "kernels"


def test_disk_full_while_a_cached_kernel_is_copied_fails_leaving_no_part(tmp_path, cache, monkeypatch):
    """The build's disk, not the cache, is full: the compile fails naming the library, and no `.part` is left to be
    listed in the build."""
    compile_rope(tmp_path / "a")
    real_open = open

    class HalfWritten:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(kernel_cache, "open", lambda path, mode: HalfWritten(real_open(path, mode)), raising=False)
    out = tmp_path / "b"
    with pytest.raises(OSError) as raised:
        compile_rope(out)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(out / "cpu_rope_kv_write.so")
    assert sorted(p.name for p in out.iterdir()) == ["cpu_rope_kv_write.cpp"]


def test_a_compiler_out_of_space_fails_the_build_not_the_kernels(tmp_path, monkeypatch):
    """A compiler without room to write is not a missing toolchain: no quiet fallback to the PyTorch ops."""
    monkeypatch.setenv("PLLM_KERNEL_CACHE", "")
    said = {"out of space": "/usr/bin/ld: final link failed: No space left on device | collect2: error",
            "toolchain": "g++: error: unrecognized command-line option '-mavx2'"}
    monkeypatch.setattr(cpu_compile, "_run_compiler", lambda cmd, cwd: said[which])
    which = "out of space"
    with pytest.raises(OSError, match="final link failed") as raised:
        compile_rope(tmp_path / "a")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "a" / "cpu_rope_kv_write.so")
    which = "toolchain"
    with pytest.raises(AssertionError, match="unrecognized command-line option"):
        compile_rope(tmp_path / "b")  # the manifest's {"error": ...}: served with the PyTorch ops


@pytest.mark.parametrize("failing", [".so", ".sha256"])
def test_a_failed_store_leaves_no_temporary_and_no_half_entry(tmp_path, cache, monkeypatch, failing):
    real_fdopen = os.fdopen

    def fdopen(fd, mode):
        f = real_fdopen(fd, mode)
        if os.readlink(f"/proc/self/fd/{fd}").endswith(failing):
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f

    monkeypatch.setattr(kernel_cache.os, "fdopen", fdopen)
    compile_rope(tmp_path / "a")
    assert list(cache.iterdir()) == []


def entry(folder, n: int, size: int, used: float) -> str:
    key = f"{n:064x}"
    for suffix, data in ((".so", b"x" * size), (".sha256", b"h" * 64)):
        (folder / f"{key}{suffix}").write_bytes(data)
        os.utime(folder / f"{key}{suffix}", (used, used))
    return key


def test_the_cache_keeps_its_size_dropping_the_least_recently_used(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    now = time.time()
    keys = [entry(folder, n, 1000, now - 100 * (4 - n)) for n in range(4)]  # keys[3] used last
    (folder / "notes.txt").write_text("not the cache's: never touched")
    stale_temp, fresh_temp = folder / f".{keys[0]}abcdefgh.so", folder / f".{keys[1]}abcdefgh.sha256"
    stale_temp.write_bytes(b"killed writer")
    os.utime(stale_temp, (now - 2 * kernel_cache.STALE_S,) * 2)
    fresh_temp.write_bytes(b"a writer at work")
    lone = folder / f"{9:064x}.sha256"  # a hash whose library a killed writer never placed
    lone.write_bytes(b"h" * 64)
    os.utime(lone, (now - 2 * kernel_cache.STALE_S,) * 2)
    kernel_cache.evict(folder, max_bytes=2 * 1064)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [fresh_temp.name, "notes.txt", *(f"{k}{s}" for k in keys[2:] for s in (".so", ".sha256"))])


def test_a_use_makes_an_entry_recent(tmp_path, cache, compiles):
    compile_rope(tmp_path / "a")
    (library,) = cache.glob("*.so")
    os.utime(library, (1, 1))
    compile_rope(tmp_path / "b")
    assert len(compiles) == 1 and library.stat().st_mtime > time.time() - 60
