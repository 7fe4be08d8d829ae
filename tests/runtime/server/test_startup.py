"""pllm-serve's start-up order: the flags parse and the build starts opening before torch or the HTTP stack is
imported; the opened build is what the engine would open itself, and its errors reach the caller."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from pllm.compiler.manifest import BuildDirError
from pllm.runtime.engine.build_open import BuildOpening, open_verified
from pllm.runtime.server.cli import main

HEAVY = ("torch", "fastapi", "pydantic", "uvicorn", "starlette", "transformers")


def test_flags_parse_and_the_build_opens_before_torch_or_the_http_stack(tiny_build):
    code = (
        "import sys\n"
        "from pllm.runtime.server.cli import BuildOpening, build_parser\n"
        f"args = build_parser().parse_args([{str(tiny_build('llama'))!r}, '--port', '1'])\n"
        "BuildOpening(args.build_dir).result()\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_build_opened_on_a_thread_is_the_one_opened_here(tiny_build):
    build = tiny_build("llama")
    here, there = open_verified(str(build)), BuildOpening(str(build)).result()
    assert there.build.manifest == here.build.manifest and there.build.path == here.build.path
    text = "Hello, world! a b c"
    assert there.tokenizer(text).input_ids == here.tokenizer(text).input_ids


def test_a_tampered_build_is_named_by_the_opening(tiny_build, tmp_path):
    build = tmp_path / "build"
    shutil.copytree(tiny_build("llama"), build)
    with open(build / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    opening = BuildOpening(str(build))
    with pytest.raises(BuildDirError, match="model.safetensors"):
        opening.result()


def test_pllm_serve_names_a_bad_build_and_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--port", "1"]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
