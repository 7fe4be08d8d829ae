"""The swap of a finished build into place: a failure, an interrupt or a kill at any point leaves the previous build
(or puts it back); an edit made while compiling is kept; the output folder keeps its mode and group."""

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_checks import run_cli, snapshot
from safetensors import SafetensorError

from pllm.compiler import build as build_module
from pllm.compiler import cpu_compile
from pllm.compiler import output_dir as output_dir_module
from pllm.compiler.build import BuildOptions, build
from pllm.compiler.cli import main as compile_main

OPTS = BuildOptions(dtype="float32", progress=False)  # as the tiny_build fixture it rebuilds over


@pytest.fixture
def old_build(tiny_build, tmp_path):
    """A private copy of a real pllm build, at tmp_path/work/out."""
    return Path(shutil.copytree(tiny_build("llama"), tmp_path / "work" / "out"))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def fail_moving_in(monkeypatch, exc: BaseException) -> None:
    """The new build's rename onto the output raises `exc` (after the previous build was moved aside)."""
    real = Path.rename

    def rename(self, target):
        if self.name == "build" and self.parent.name.startswith(".out.tmp-"):
            raise exc
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)


def test_failed_move_in_puts_the_previous_build_back(old_build, tiny_dir, tmp_path, monkeypatch, capsys):
    before = snapshot(tmp_path / "work")
    fail_moving_in(monkeypatch, OSError(errno.EXDEV, os.strerror(errno.EXDEV), "out"))
    line = run_cli([str(tiny_dir("llama")), "-o", str(old_build), "--dtype", "float32"], capsys)
    assert os.strerror(errno.EXDEV) in line
    assert snapshot(tmp_path / "work") == before  # the previous build in place; no scratch left


def interrupted_compile(args: list[str], capsys) -> int:
    capsys.readouterr()
    try:
        return compile_main(args)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped pllm-compile as a traceback")


def test_interrupt_mid_swap_puts_the_previous_build_back(old_build, tiny_dir, tmp_path, monkeypatch, capsys):
    before = snapshot(tmp_path / "work")
    fail_moving_in(monkeypatch, KeyboardInterrupt())
    args = [str(tiny_dir("llama")), "-o", str(old_build), "-q", "--dtype", "float32"]
    assert interrupted_compile(args, capsys) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted by SIGINT" in err[0] and "Traceback" not in err[0], err
    assert snapshot(tmp_path / "work") == before


KILL_IN_SWAP = """
import os, signal, sys
from pathlib import Path
real = Path.rename
def rename(self, target):
    done = real(self, target)
    if Path(target).name == "build" and Path(target).parent.name.startswith(".out.old-"):
        os.kill(os.getpid(), signal.SIGKILL)  # power loss: the previous build moved aside, the new one not in
    return done
Path.rename = rename
from pllm.compiler.cli import main
main([sys.argv[1], "-o", sys.argv[2], "-q", "--dtype", "float32"])
"""


def test_killed_swap_previous_build_is_put_back_by_a_sibling_compile(old_build, tiny_dir, tmp_path):
    before = snapshot(old_build)
    proc = subprocess.run([sys.executable, "-c", KILL_IN_SWAP, str(tiny_dir("llama")), str(old_build)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    work = old_build.parent
    assert not old_build.exists() and any(".out.old-" in p.name for p in work.iterdir())
    build(str(tiny_dir("llama")), work / "other", OPTS)  # another output in the same folder
    assert snapshot(old_build) == before
    assert sorted(p.name for p in work.iterdir()) == ["other", "out"]


def stale_previous(work: Path, build_dir: Path) -> Path:
    """`build_dir` moved aside as a killed compile's swap leaves it: `.out.old-<dead pid>-.../build`."""
    old = work / f".out.old-{dead_pid()}-abcdefgh"
    old.mkdir()
    (old / ".pllm-lock").touch()
    shutil.move(build_dir, old / "build")
    return old


def test_previous_build_is_kept_while_its_place_holds_no_build(old_build, tiny_dir, tmp_path, caplog):
    work = old_build.parent
    kept = stale_previous(work, shutil.copytree(old_build, tmp_path / "copy"))
    shutil.rmtree(old_build)
    old_build.mkdir()
    (old_build / "notes.txt").write_text("the user's own folder, made since")
    before = snapshot(work)
    with caplog.at_level("WARNING", logger="pllm"):
        build(str(tiny_dir("llama")), work / "other", OPTS)
    assert "kept since" in caplog.text and str(kept / "build") in caplog.text
    shutil.rmtree(work / "other")
    assert snapshot(work) == before


def test_previous_build_is_deleted_once_its_place_holds_a_complete_build(old_build, tiny_dir, tmp_path):
    work = old_build.parent
    stale_previous(work, shutil.copytree(old_build, tmp_path / "copy"))
    half = work / f".out.old-{dead_pid()}-zzzzzzzz"
    (half / "discarded" / "kernels").mkdir(parents=True)  # killed while it deleted a previous build it had replaced
    (half / ".pllm-lock").touch()
    build(str(tiny_dir("llama")), work / "other", OPTS)
    assert sorted(p.name for p in work.iterdir()) == ["other", "out"]


def edit_while_compiling(monkeypatch, edit) -> None:
    real = build_module.compile_cpu_kernels

    def compile_then_edit(*args):
        edit()
        return real(*args)

    monkeypatch.setattr(build_module, "compile_cpu_kernels", compile_then_edit)


def test_edit_made_while_compiling_is_kept(old_build, tiny_dir, tmp_path, monkeypatch, capsys):
    """The first look hashed the file; an edit after it (same size, its times set back: only the change time and
    the bytes tell) is the user's: the compile refuses and the build stays as the user left it."""
    config = old_build / "hf_config.json"
    text = config.read_text()
    edited = text.replace('"', "'", 2)
    st = config.stat()

    def edit():
        config.write_text(edited)
        os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns))

    edit_while_compiling(monkeypatch, edit)
    line = run_cli([str(tiny_dir("llama")), "-o", str(old_build), "--dtype", "float32"], capsys)
    assert "hf_config.json (changed since it was built)" in line and str(old_build) in line, line
    assert config.read_text() == edited
    assert sorted(p.name for p in old_build.parent.iterdir()) == ["out"]


def test_file_touched_but_unchanged_while_compiling_is_replaced(old_build, tiny_dir, monkeypatch):
    edit_while_compiling(monkeypatch, lambda: os.utime(old_build / "hf_config.json"))
    assert build(str(tiny_dir("llama")), old_build, OPTS) == old_build


def other_group() -> int | None:
    """A group this process may give its files other than its own, if any."""
    if os.geteuid() == 0:
        return os.getegid() + 1
    return next((g for g in os.getgroups() if g != os.getegid()), None)


def test_output_folder_keeps_its_mode_and_group(tiny_dir, tmp_path):
    out = tmp_path / "private"
    out.mkdir()
    out.chmod(0o700)
    group = other_group()
    if group is not None:
        os.chown(out, -1, group)
    build(str(tiny_dir("llama")), out, OPTS)  # an empty folder prepared for the build
    assert out.stat().st_mode & 0o7777 == 0o700
    if group is not None:
        assert out.stat().st_gid == group
    out.chmod(0o750)  # a build made private (to a group) after compiling, then compiled again
    build(str(tiny_dir("llama")), out, OPTS)
    assert out.stat().st_mode & 0o7777 == 0o750


def test_output_that_holds_the_current_directory_is_refused(old_build, tiny_dir, tmp_path, monkeypatch, capsys):
    before = snapshot(tmp_path / "work")
    monkeypatch.chdir(old_build)
    line = run_cli([str(tiny_dir("llama")), "-o", "."], capsys)
    assert "is the current directory" in line, line
    monkeypatch.chdir(old_build / "kernels")
    line = run_cli([str(tiny_dir("llama")), "-o", str(old_build)], capsys)
    assert f"{old_build}: is the current directory or holds it" in line, line
    assert snapshot(tmp_path / "work") == before


def test_disk_full_while_writing_weights_is_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(output_dir_module, "save_file", full)
    line = run_cli([str(tiny_dir("llama")), "-o", str(tmp_path / "a" / "out")], capsys)
    assert line.endswith("/build/model.safetensors: No space left on device"), line
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_mid_compile_is_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "copy_tokenizer_files", interrupt)  # the weights are written by then
    assert interrupted_compile([str(tiny_dir("llama")), "-o", str(tmp_path / "a" / "out"), "-q"], capsys) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted by SIGINT" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


TERM_MID_COMPILE = """
import os, signal, sys
from pllm.compiler import build
real = build.copy_tokenizer_files
def term(*args):
    os.kill(os.getpid(), signal.SIGTERM)  # docker stop: the weights are written by now
    return real(*args)
build.copy_tokenizer_files = term
from pllm.compiler.cli import main
sys.exit(main([sys.argv[1], "-o", sys.argv[2], "-q"]))
"""


def test_sigterm_mid_compile_cleans_up_like_ctrl_c(tiny_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", TERM_MID_COMPILE, str(tiny_dir("llama")), str(work / "a" / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted by SIGTERM" in lines[0], proc.stderr
    assert list(work.iterdir()) == []  # the scratch folder and the parents it made are gone


# A thread the interpreter waits for at exit, as a compile's workers can be: a Ctrl-C lands while it waits
CTRL_C_AT_EXIT_THREAD = """
import os, signal, threading, time
def ctrl_c_at_exit(event):
    def late():
        event.wait(300)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
    threading.Thread(target=late).start()
"""

TWO_CTRL_C = CTRL_C_AT_EXIT_THREAD + """
import sys
from pllm.compiler import build, cli
real_copy, real_remove = build.copy_tokenizer_files, build.remove_scratch_dir
cleaned = threading.Event()
def first(*args):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the weights are written by now
    return real_copy(*args)
def cleaning(*args):
    os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while the scratch folder is being removed
    real_remove(*args)
    cleaned.set()
build.copy_tokenizer_files, build.remove_scratch_dir = first, cleaning
ctrl_c_at_exit(cleaned)  # and a third after the message
sys.exit(cli.entry())
"""


def test_more_ctrl_c_during_the_clean_up_and_the_exit_are_ignored(tiny_dir, tmp_path):
    """The first Ctrl-C stops the compile; one during its clean-up, or while the interpreter waits for threads
    after the message, no longer cuts the clean-up short or prints a traceback."""
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", TWO_CTRL_C, str(tiny_dir("llama")), "-o", str(work / "a" / "out"),
                           "-q"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted by SIGINT" in lines[0], proc.stderr
    assert list(work.iterdir()) == []


CTRL_C_AT_EXIT = CTRL_C_AT_EXIT_THREAD + """
import sys
from pllm.compiler import cli
real, done = cli.main, threading.Event()
def main(*args):
    code = real(*args)
    done.set()
    return code
cli.main = main
ctrl_c_at_exit(done)  # after the build is complete
sys.exit(cli.entry())
"""


def test_ctrl_c_after_a_finished_compile_leaves_its_success(tiny_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", CTRL_C_AT_EXIT, str(tiny_dir("llama")), "-o", str(out), "-q"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert (out / "manifest.json").is_file()


def test_disk_full_while_compiling_kernels_is_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    """Not the quiet fallback to the PyTorch ops that a missing toolchain gets."""
    monkeypatch.setenv("PLLM_KERNEL_CACHE", "")
    monkeypatch.setattr(cpu_compile, "find_compiler", lambda: "g++")
    monkeypatch.setattr(cpu_compile, "_run_compiler", lambda cmd, cwd: "ld: final link failed: No space left on device")
    line = run_cli([str(tiny_dir("llama")), "-o", str(tmp_path / "a" / "out"), "--dtype", "float32"], capsys)
    assert ".so: No space left on device (g++: ld: final link failed" in line, line
    assert list(tmp_path.iterdir()) == []
