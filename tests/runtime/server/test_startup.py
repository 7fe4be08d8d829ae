"""pllm-serve's start-up order: the flags parse and the build starts opening before torch or the HTTP stack is
imported; the opened build is what the engine would open itself, and its errors reach the caller."""

from __future__ import annotations

import gc
import shutil
import subprocess
import sys

import pytest
import torch

from pllm import LLM, SamplingParams
from pllm.compiler.manifest import BuildDirError
from pllm.runtime.engine.build_open import BuildOpening, open_verified
from pllm.runtime.engine.config import EngineConfig
from pllm.runtime.engine.engine import LLMEngine
from pllm.runtime.server.cli import main, reads_weights_early
from pllm.runtime.server.cli_args import build_parser

HEAVY = ("torch", "fastapi", "pydantic", "uvicorn", "starlette", "transformers")


def test_flags_parse_and_the_build_opens_before_torch_or_the_http_stack(tiny_build):
    code = (
        "import sys\n"
        "from pllm.runtime.server.cli import BuildOpening, build_parser, reads_weights_early\n"
        f"args = build_parser().parse_args([{str(tiny_build('llama'))!r}, '--port', '1', '--backend', 'cpu', "
        "'--huge-pages'])\n"
        "opened = BuildOpening(args.build_dir, reads_weights_early(args)).result()\n"
        "assert opened.weights is not None and opened.weights.tensors\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("flags, early", [
    (["--backend", "cpu", "--huge-pages"], True),
    (["--backend", "cpu"], False),
    (["--huge-pages"], False),  # auto: read at load
    (["--backend", "cuda", "--huge-pages"], False),
    (["--backend", "interpret", "--huge-pages"], False),
    (["--backend", "cpu", "--huge-pages", "--tensor-parallel-size", "2"], False),
])
def test_the_weights_are_read_early_only_for_a_one_process_cpu_engine_in_huge_pages(flags, early):
    assert reads_weights_early(build_parser().parse_args(["build", *flags])) is early


def test_an_engine_over_weights_read_early_is_the_engine_that_reads_them(tiny_build):
    """The weights the opening read are the ones the model computes with, and it computes as one that read them
    itself."""
    build = str(tiny_build("llama"))
    opened = BuildOpening(build, read_weights=True)
    early = LLMEngine(build, EngineConfig(backend="cpu", kv_cache_memory=1 << 24, huge_pages=True), opening=opened)
    resident = opened.result().weights
    arena = torch.frombuffer(resident.memory, dtype=torch.uint8)
    first, last = arena.data_ptr(), arena.data_ptr() + arena.numel()
    embed = early.runner.model.w["embed_tokens"]
    assert first <= embed.data_ptr() < last
    plain = LLM(build, backend="cpu", kv_cache_memory=1 << 24)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompt = list(range(5, 25))
    early.add_request("a", prompt, params)
    plain.engine.add_request("a", prompt, params)
    tokens = {}
    for name, engine in (("early", early), ("plain", plain.engine)):
        while engine.has_unfinished():
            for out in engine.step():
                tokens[name] = out.outputs[0].token_ids
    assert tokens["early"] == tokens["plain"] and len(tokens["early"]) == 8


def test_a_build_opened_on_a_thread_is_the_one_opened_here(tiny_build):
    build = tiny_build("llama")
    here, there = open_verified(str(build)), BuildOpening(str(build)).result()
    assert there.build.manifest == here.build.manifest and there.build.path == here.build.path
    text = "Hello, world! a b c"
    assert there.tokenizer(text).input_ids == here.tokenizer(text).input_ids


def test_a_tampered_build_is_named_by_the_opening(tiny_build, tmp_path):
    """Hashed before the weights are read: a header made unreadable is a hash mismatch, not a parse error."""
    build = tmp_path / "build"
    shutil.copytree(tiny_build("llama"), build)
    with open(build / "model.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"!")
    for read_weights in (False, True):
        opening = BuildOpening(str(build), read_weights)
        with pytest.raises(BuildDirError, match="model.safetensors: sha256 does not match the manifest"):
            opening.result()


def test_pllm_serve_names_a_bad_build_and_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--port", "1"]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    assert gc.isenabled()  # start-up holds collection off only until it ends, however it ends
